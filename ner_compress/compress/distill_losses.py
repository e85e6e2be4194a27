"""What a student learns from its teacher besides the labels: recorded features, their losses, and how
both distillers (width supernet, student) weigh and sum them.

``FeatureRecorder`` keeps an encoder's hidden states and attention probabilities (forward hooks, so any
model and any forward work, including PaddleSlim's supernet). The losses average over real characters
only: ``[CLS]``, ``[SEP]`` and padding carry no signal a tagger needs.
"""
from dataclasses import dataclass
from functools import partial

import paddle
import paddle.nn.functional as F

from ner_compress.core import parallel
from ner_compress.data.corpus import IGNORE_INDEX


class FeatureRecorder:
    """The features of ``model``'s encoder at its latest forward, numbered as ``compress.matches`` numbers
    them (PaddleNLP's ``hidden_states`` and ``attentions``): hidden 0 is the encoder's input, hidden i the
    output of encoder layer i (the last after the encoder's final LayerNorm, if any); attention i the
    probabilities of layer i, recorded when the forward is asked for them (``output_attentions=True``)."""

    def __init__(self, model):
        encoder = model.base_model.encoder
        self.layers = len(encoder.layers)
        self._hidden, self._attention = {}, {}
        self._handles = [encoder.layers[0].register_forward_pre_hook(self._keep_input)]
        self._handles += [layer.register_forward_post_hook(partial(self._keep_output, i))
                          for i, layer in enumerate(encoder.layers, 1)]
        if getattr(encoder, "norm", None) is not None:  # pre-LN: the final norm's output is the last state
            self._handles.append(encoder.norm.register_forward_post_hook(partial(self._keep_output, self.layers)))

    def _keep_input(self, layer, inputs):
        self._hidden[0] = inputs[0]

    def _keep_output(self, index, layer, inputs, output):
        if isinstance(output, (tuple, list)):  # (hidden, attention probabilities) when asked for them
            self._hidden[index] = output[0]
            if len(output) > 1:
                self._attention[index] = output[-1]
        else:
            self._hidden[index] = output

    def hidden(self, index):
        return self._hidden[index]

    def attention(self, index):
        if index not in self._attention:
            raise KeyError(f"attention {index} was not recorded: run the model with output_attentions=True")
        return self._attention[index]

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


@dataclass(frozen=True)
class LabelWeights:
    """How a distilled model's logits are trained: toward the teacher's and toward the gold labels."""
    logit: float  # soft cross-entropy to the teacher's distribution
    hard: float = 0.0  # cross-entropy to the gold labels
    temperature: float = 1.0


def label_parts(weights, student_logits, teacher_logits, labels, tokens):
    """{name: (weight, loss)} of the logit terms, each a share of the global batch's mean over real characters
    (``tokens``: their count over all processes)."""
    soft = soft_cross_entropy_sum(student_logits, teacher_logits, labels, weights.temperature) / tokens
    # T^2 keeps the soft term's gradient scale independent of the temperature (Hinton et al.)
    parts = {"logit": (weights.logit * weights.temperature ** 2, soft)}
    if weights.hard:
        parts["hard"] = (weights.hard, F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX,
                                                       reduction="sum") / tokens)
    return parts


def backward_parts(parts):
    """Backward of the weighted sum of ``parts`` ({name: (weight, loss)}); the total ("loss") and each part's
    loss, summed over processes (each process holds its share of the global mean)."""
    total = paddle.add_n([weight * loss for weight, loss in parts.values()])
    total.backward()
    return {"loss": parallel.all_reduce_sum(float(total)),
            **{name: parallel.all_reduce_sum(float(loss)) for name, (_, loss) in parts.items()}}
