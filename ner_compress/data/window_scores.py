"""A model's scores over windows: batches padded to a bucket length, log-probabilities per window, stitched
per sentence, decoded. ``logits_fn(input_ids, token_type_ids)`` is any numpy-in, numpy-out function (a dynamic
model in training, a predictor or an ONNX Runtime session in deployment), so training's dev F1 and a deployed
tagger score exactly alike.
"""
import numpy as np

from ner_compress.data.corpus import eval_batches, padded, stitch_scores
from ner_compress.data.decoding import log_softmax

# Paddle Inference's oneDNN rebuilds its primitives for every new input shape (about 5 ms at
# batch 1 on the demo model); multiples of 16 leave at most 8 lengths up to 128 and pad a
# sentence by 8 positions on average
BUCKET = 16


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
