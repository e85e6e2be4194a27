"""From per-character label scores to BIO tags: BIO-constrained Viterbi, or plain argmax.

Viterbi runs over log-probabilities with the transitions BIO forbids set to -inf
(``O -> I-X``, ``B-X -> I-Y``, ``I-X -> I-Y`` and a sentence starting with ``I-X``), no learned
weights, so it never emits an ``I-X`` that does not continue an ``X`` entity. Where argmax is
already a valid BIO sequence, Viterbi returns exactly it.
"""
import numpy as np

DECODINGS = ("viterbi", "argmax")


def log_softmax(logits):
    logits = np.asarray(logits, dtype="float32")
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def bio_constraints(labels):
    """(allowed[prev, cur], allowed_at_start[cur]) as boolean arrays over ``labels``."""
    n = len(labels)
    allowed = np.ones((n, n), dtype=bool)
    start = np.ones(n, dtype=bool)
    for cur, label in enumerate(labels):
        if not label.startswith("I-"):
            continue
        start[cur] = False
        for prev, prev_label in enumerate(labels):
            allowed[prev, cur] = prev_label in (f"B-{label[2:]}", label)
    return allowed, start


def viterbi(scores, allowed, start):
    """Best label ids for ``scores`` [T, L] under the boolean constraints."""
    length = len(scores)
    if length == 0:
        return np.zeros(0, dtype="int64")
    penalty = np.where(allowed, 0.0, -np.inf)
    best = np.where(start, scores[0], -np.inf)
    back = np.zeros((length, scores.shape[1]), dtype="int64")
    for t in range(1, length):
        candidates = best[:, None] + penalty  # [prev, cur]
        back[t] = candidates.argmax(0)
        best = candidates[back[t], np.arange(len(best))] + scores[t]
    path = np.empty(length, dtype="int64")
    path[-1] = int(best.argmax())
    for t in range(length - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


class Decoder:
    """``decoder(scores [T, L]) -> list of tags``, with the constraints of one label list."""

    def __init__(self, labels, method="viterbi"):
        if method not in DECODINGS:
            from ner_compress.core.errors import UserError

            raise UserError(f"--decoding {method}: use one of {', '.join(DECODINGS)}")
        self.labels, self.method = list(labels), method
        self.allowed, self.start = bio_constraints(self.labels)

    def __call__(self, scores):
        ids = np.asarray(scores).argmax(-1)
        if self.method == "viterbi" and not self.valid(ids):
            ids = viterbi(scores, self.allowed, self.start)
        return list(map(self.labels.__getitem__, np.asarray(ids).tolist()))

    def valid(self, ids):
        """A valid argmax path is also the best valid path: Viterbi is only needed otherwise."""
        return len(ids) == 0 or bool(self.start[ids[0]] and self.allowed[ids[:-1], ids[1:]].all())
