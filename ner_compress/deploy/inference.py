"""Text in, entities out, around any backend's logits (see ``backends``).

The static directory is self-contained: the program and weights (``static_files``), the
vocabulary and ``inference.json`` (labels, maximum length). Long texts are cut into
half-overlapping windows and stitched back, each character from the window where it has the
most context; the whole sentence is then decoded at once (BIO-constrained Viterbi by default).
Batches are padded up to a bucket length (a multiple of ``BUCKET``): the model masks [PAD]
positions, so the real positions' logits do not change, and a backend sees few distinct shapes.
"""
import json
import os

import numpy as np

from ner_compress.data.corpus import Sentence, encode, eval_batches, load_encoder, padded, stitch_scores
from ner_compress.data.decoding import Decoder, log_softmax
from ner_compress.core.errors import UserError
from ner_compress.data.entity_scores import extract_entities
from ner_compress.core.static_files import MODEL_PREFIX, PROGRAM_FILES, program_file  # noqa: F401  (MODEL_PREFIX: re-exported)

INFERENCE_META = "inference.json"
# Paddle Inference's oneDNN rebuilds its primitives for every new input shape (about 5 ms at
# batch 1 on the demo model); multiples of 16 leave at most 8 lengths up to 128 and pad a
# sentence by 8 positions on average
BUCKET = 16


def read_meta(model_dir):
    path = os.path.join(model_dir, INFERENCE_META)
    if not os.path.isfile(path) or program_file(model_dir) is None:
        raise UserError(f"{model_dir}: not an exported static model (no {INFERENCE_META} or "
                        f"{' or '.join(PROGRAM_FILES)}); run `python tools/export.py` first")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def bucket_length(length, multiple=BUCKET):
    """``length`` rounded up to a multiple of ``multiple`` (no rounding when ``multiple`` is 0)."""
    return -(-length // multiple) * multiple if multiple else length


def model_inputs(windows, pad_id, multiple=BUCKET):
    """What a backend is fed for ``windows``: ids padded on the right with ``pad_id`` up to the
    ``bucket_length`` of the longest (no labels: this runs once per request)."""
    width = bucket_length(max(len(w.input_ids) for w in windows), multiple)
    input_ids = padded([w.input_ids for w in windows], pad_id, width)
    return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids)}


def window_log_probs(logits_fn, windows, batch_size, pad_id, bucket=BUCKET):
    """Log-probabilities [characters, labels] per window (positions 1..n), in the windows' order.

    ``logits_fn(input_ids, token_type_ids)`` takes and returns numpy arrays (a predictor, ONNX
    Runtime, or ``modeling.numpy_logits``); batches are padded with ``pad_id``, the vocabulary's
    [PAD], to a multiple of ``bucket`` positions (0: to the longest window only).
    """
    out = [None] * len(windows)
    for idx in eval_batches(windows, batch_size):
        batch = model_inputs([windows[i] for i in idx], pad_id, bucket)
        scores = log_softmax(logits_fn(batch["input_ids"], batch["token_type_ids"]))
        for row, i in enumerate(idx):
            out[i] = scores[row, 1: len(windows[i].input_ids) - 1]
    return out


def sentence_log_probs(logits_fn, sentences, windows, batch_size, pad_id, bucket=BUCKET):
    """Log-probabilities [characters, labels] per sentence, stitched from its windows."""
    scores = window_log_probs(logits_fn, windows, batch_size, pad_id, bucket)
    return stitch_scores([len(s.chars) for s in sentences], windows, scores)


def tag_sentences(logits_fn, sentences, windows, batch_size, pad_id, decoder, bucket=BUCKET):
    """BIO tags per sentence: window scores stitched per sentence, then decoded whole."""
    return [decoder(s) for s in sentence_log_probs(logits_fn, sentences, windows, batch_size, pad_id, bucket)]


class Tagger:
    """Text -> entities around one ``logits(input_ids, token_type_ids)``; backends subclass it."""

    def __init__(self, model_dir, batch_size=32, decoding="viterbi", bucket=True):
        self.meta = read_meta(model_dir)
        self.labels = self.meta["labels"]
        self.max_seq_length = int(self.meta["max_seq_length"])
        self.encoder = load_encoder(os.path.join(model_dir, "vocab.txt"))  # with the directory's lookup rule
        self.batch_size = batch_size
        self.decoder = Decoder(self.labels, decoding)
        self.bucket = BUCKET if bucket else 0

    def logits(self, input_ids, token_type_ids):
        raise NotImplementedError

    def windows(self, sentences):
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        return encode(sentences, self.encoder, label_to_id, self.max_seq_length)

    def tag_sentences(self, sentences):
        """Predicted BIO tags per sentence (``Sentence.tags`` may be empty)."""
        return tag_sentences(self.logits, sentences, self.windows(sentences), self.batch_size, self.encoder.pad_id,
                             self.decoder, self.bucket)

    def batch(self, windows):
        """The model inputs of ``windows`` as this tagger pads them (bucketed)."""
        return model_inputs(windows, self.encoder.pad_id, self.bucket)

    def predict(self, texts):
        """``[{text, entities}]`` for each text; empty texts give no entities."""
        results = [{"text": t, "entities": []} for t in texts]
        live = [i for i, t in enumerate(texts) if t]
        tags = self.tag_sentences([Sentence(list(texts[i]), []) for i in live])
        for i, sentence_tags in zip(live, tags):
            results[i]["entities"] = extract_entities(texts[i], sentence_tags)
        return results
