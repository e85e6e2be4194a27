"""Text in, entities out, around any backend's logits (see ``backends``).

The static directory is self-contained: ``model.pdmodel``/``model.pdiparams``, the
vocabulary and ``inference.json`` (labels, maximum length). Long texts are cut into
half-overlapping windows and stitched back, each character from the window where it has the
most context; the whole sentence is then decoded at once (BIO-constrained Viterbi by default).
"""
import json
import os

from .data import CharEncoder, Sentence, collate, encode, eval_batches, load_vocab, stitch_scores
from .decoding import Decoder, log_softmax
from .errors import UserError
from .metrics import extract_entities

MODEL_PREFIX = "model"
INFERENCE_META = "inference.json"


def read_meta(model_dir):
    path = os.path.join(model_dir, INFERENCE_META)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(model_dir, MODEL_PREFIX + ".pdmodel")):
        raise UserError(f"{model_dir}: not an exported static model (no {INFERENCE_META} or "
                        f"{MODEL_PREFIX}.pdmodel); run `python tools/export.py` first")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def window_log_probs(logits_fn, windows, batch_size, pad_id):
    """Log-probabilities [characters, labels] per window (positions 1..n), in the windows' order.

    ``logits_fn(input_ids, token_type_ids)`` takes and returns numpy arrays (a predictor, ONNX
    Runtime, or ``modeling.numpy_logits``); batches are padded with ``pad_id``, the vocabulary's [PAD].
    """
    out = [None] * len(windows)
    for idx in eval_batches(windows, batch_size):
        batch = collate([windows[i] for i in idx], pad_id)
        scores = log_softmax(logits_fn(batch["input_ids"], batch["token_type_ids"]))
        for row, i in enumerate(idx):
            out[i] = scores[row, 1: len(windows[i].input_ids) - 1]
    return out


def sentence_log_probs(logits_fn, sentences, windows, batch_size, pad_id):
    """Log-probabilities [characters, labels] per sentence, stitched from its windows."""
    scores = window_log_probs(logits_fn, windows, batch_size, pad_id)
    return stitch_scores([len(s.chars) for s in sentences], windows, scores)


def tag_sentences(logits_fn, sentences, windows, batch_size, pad_id, decoder):
    """BIO tags per sentence: window scores stitched per sentence, then decoded whole."""
    return [decoder(s) for s in sentence_log_probs(logits_fn, sentences, windows, batch_size, pad_id)]


class Tagger:
    """Text -> entities around one ``logits(input_ids, token_type_ids)``; backends subclass it."""

    def __init__(self, model_dir, batch_size=32, decoding="viterbi"):
        self.meta = read_meta(model_dir)
        self.labels = self.meta["labels"]
        self.max_seq_length = int(self.meta["max_seq_length"])
        self.encoder = CharEncoder(load_vocab(os.path.join(model_dir, "vocab.txt")))
        self.batch_size = batch_size
        self.decoder = Decoder(self.labels, decoding)

    def logits(self, input_ids, token_type_ids):
        raise NotImplementedError

    def windows(self, sentences):
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        return encode(sentences, self.encoder, label_to_id, self.max_seq_length)

    def tag_sentences(self, sentences):
        """Predicted BIO tags per sentence (``Sentence.tags`` may be empty)."""
        return tag_sentences(self.logits, sentences, self.windows(sentences), self.batch_size, self.encoder.pad_id,
                             self.decoder)

    def predict(self, texts):
        """``[{text, entities}]`` for each text; empty texts give no entities."""
        results = [{"text": t, "entities": []} for t in texts]
        live = [i for i, t in enumerate(texts) if t]
        tags = self.tag_sentences([Sentence(list(texts[i]), []) for i in live])
        for i, sentence_tags in zip(live, tags):
            results[i]["entities"] = extract_entities(texts[i], sentence_tags)
        return results
