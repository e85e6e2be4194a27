"""Vocabularies and how characters are looked up in them: one id per character, always.

BERT's WordPiece ``vocab.txt`` needs no rule. Any other vocabulary (XLM-R's SentencePiece pieces)
carries a lookup rule, ``char_lookup.json``, beside its ``vocab.txt``; every model directory copies
both (``copy_vocab``), so training, export, predict and serve look characters up the same way.
"""
import json
import os
import shutil
import unicodedata

from ner_compress.core.errors import UserError


def load_vocab(path):
    with open(path, encoding="utf-8") as fh:
        return {line.rstrip("\n"): idx for idx, line in enumerate(fh)}


# How characters are looked up in a vocabulary that is not BERT's, beside its vocab.txt, e.g. XLM-R's:
# {"normalize": "NFKC", "word_start_marker": "\u2581", "special_tokens": {"pad": "<pad>", "unk": "<unk>",
#  "cls": "<s>", "sep": "</s>"}}. Without it, BERT's rule: the character, else its lower case.
CHAR_LOOKUP = "char_lookup.json"
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]"}


def lookup_path(vocab_file):
    return os.path.join(os.path.dirname(os.path.abspath(vocab_file)), CHAR_LOOKUP)


def load_lookup(vocab_file):
    """The lookup rule beside ``vocab_file``, or None (BERT's rule)."""
    path = lookup_path(vocab_file)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            rule = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable lookup rule ({err}); copy it again from the model directory")
    unknown = sorted(set(rule) - {"normalize", "word_start_marker", "special_tokens"})
    if unknown or rule.get("normalize") not in (None, "NFC", "NFKC", "NFD", "NFKD"):
        raise UserError(f"{path}: unknown keys {unknown} or normalize {rule.get('normalize')!r}; "
                        f"expected normalize (NFKC, ...), word_start_marker, special_tokens")
    return rule


def copy_vocab(vocab_file, directory):
    """``vocab.txt`` and its lookup rule (if any) into ``directory``: what every model directory carries."""
    shutil.copyfile(vocab_file, os.path.join(directory, "vocab.txt"))
    if os.path.isfile(lookup_path(vocab_file)):
        shutil.copyfile(lookup_path(vocab_file), os.path.join(directory, CHAR_LOOKUP))


def load_encoder(vocab_file):
    """The ``CharEncoder`` of a vocabulary file and the lookup rule beside it."""
    vocab, rule = load_vocab(vocab_file), load_lookup(vocab_file)
    specials = {**BERT_SPECIALS, **(rule or {}).get("special_tokens", {})}
    missing = [token for token in specials.values() if token not in vocab]
    if missing:
        raise UserError(f"{vocab_file}: special token(s) {missing} missing; a BERT vocabulary needs "
                        f"[PAD] [UNK] [CLS] [SEP], another one names its own in {CHAR_LOOKUP}")
    return CharEncoder(vocab, rule)


class CharEncoder:
    """Maps characters to ids of a vocabulary, one id per character.

    BERT's WordPiece vocabulary (``rule`` None): the character, else its lower case, else [UNK].
    With a lookup rule (a SentencePiece vocabulary): the character after ``normalize``, spaces
    written as the word-start marker, as a piece alone or after the marker, else the unknown piece.
    """

    def __init__(self, vocab, rule=None):
        self.vocab = vocab
        self.rule = rule
        specials = {**BERT_SPECIALS, **(rule or {}).get("special_tokens", {})}
        self.unk_id = vocab[specials["unk"]]
        self.cls_id = vocab[specials["cls"]]
        self.sep_id = vocab[specials["sep"]]
        self.pad_id = vocab[specials["pad"]]
        self._ids = {}  # character -> id, as resolved: one dict lookup per character afterwards

    def char_id(self, char):
        found = self._ids.get(char)
        if found is None:
            found = self._ids[char] = self._resolve(char)
        return found

    def _resolve(self, char):
        if self.rule is None:
            return self.vocab.get(char, self.vocab.get(char.lower(), self.unk_id))
        form, marker = self.rule.get("normalize"), self.rule.get("word_start_marker", "")
        text = unicodedata.normalize(form, char) if form else char
        text = text.replace(" ", marker) if marker else text
        for piece in (text, marker + text) if marker else (text,):
            if piece in self.vocab:
                return self.vocab[piece]
        return self.unk_id

    def unknown_count(self, sentences):
        """How many characters of ``sentences`` map to the unknown id."""
        return sum(self.char_id(c) == self.unk_id for s in sentences for c in s.chars)

    def ids(self, chars):
        known = self._ids
        return [known[c] if c in known else self.char_id(c) for c in chars]
