"""What a student learns from its teacher besides the labels: recorded features and their losses.

``FeatureRecorder`` keeps the outputs of named sublayers (forward post-hooks, so any model and
any forward work, including PaddleSlim's supernet). The losses average over real characters
only: ``[CLS]``, ``[SEP]`` and padding carry no signal a tagger needs.
"""
import paddle
import paddle.nn.functional as F

from ner_compress.data.corpus import IGNORE_INDEX


class FeatureRecorder:
    """Records the output of each named sublayer of ``model`` at every forward."""

    def __init__(self, model, names):
        layers = dict(model.named_sublayers())
        missing = [n for n in names if n not in layers]
        if missing:
            raise KeyError(f"no sublayer {missing[0]!r} in {type(model).__name__}")
        self.names = list(names)
        self.outputs = {}
        self._handles = [layers[n].register_forward_post_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def record(layer, inputs, output):
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
        return record

    def features(self):
        return [self.outputs[n] for n in self.names]

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def real_token_mask(labels):
    """1.0 on characters, 0.0 on [CLS], [SEP] and padding (float32 [batch, length, 1])."""
    return (labels != IGNORE_INDEX).astype("float32").unsqueeze(-1)


def _count(mask, count):
    """Characters to average over: this batch's, or a global count (several processes)."""
    return paddle.clip(mask.sum(), min=1.0) if count is None else count


def masked_mse(student, teacher, mask, count=None, units=None):
    """Mean squared error over real characters and ``units`` (default: the last axis)."""
    units = student.shape[-1] if units is None else units
    return ((student - teacher) ** 2 * mask).sum() / (_count(mask, count) * units)


def masked_cosine(student, teacher, mask, count=None):
    """1 - cosine similarity per character, averaged over real characters."""
    cos = F.cosine_similarity(student, teacher, axis=-1).unsqueeze(-1)
    return ((1.0 - cos) * mask).sum() / _count(mask, count)


FEATURE_LOSSES = {"mse": masked_mse, "cosine": masked_cosine}


def _query_rows(probs):
    """[batch, heads, query, key] -> [batch, query, heads * key]: one row per character."""
    return probs.transpose([0, 2, 1, 3]).reshape([0, 0, -1])


def attention_loss(loss, student, teacher, mask, count=None):
    """``loss`` (mse or cosine) between attention probabilities [batch, heads, query, key] over real
    query characters; head by head when the head counts agree, else between the means over heads.

    MSE sums over keys (each row is a distribution) and averages over heads, so the padded
    length of a batch, which differs between one process and several, does not change it.
    """
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    rows_s, rows_t = _query_rows(student), _query_rows(teacher)
    if loss == "mse":
        return masked_mse(rows_s, rows_t, mask, count, units=student.shape[1])
    return FEATURE_LOSSES[loss](rows_s, rows_t, mask, count)


def soft_cross_entropy_sum(student_logits, teacher_logits, labels, temperature=1.0):
    """Cross-entropy to the teacher's (tempered) distribution, summed over real characters only."""
    teacher_probs = F.softmax(teacher_logits.detach() / temperature, axis=-1)
    per_token = -(teacher_probs * F.log_softmax(student_logits / temperature, axis=-1)).sum(-1)
    return (per_token * (labels != IGNORE_INDEX).astype(per_token.dtype)).sum()
