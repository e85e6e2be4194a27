"""The student's objective as data (TextBrewer's ``intermediate_matches``), checked against both models.

One match: ``{student_layer, teacher_layer, feature, loss, weight}``.

- ``feature: hidden``: hidden states; layer 0 is the embeddings, layer i the output of encoder
  layer i (1-based), so the teacher's last layer is its ``num_hidden_layers``. Hidden states of
  different sizes go through a learned linear projection (TinyBERT) that is not part of the student.
- ``feature: attention``: attention probabilities of encoder layer i (1 .. layers); compared
  head by head when the head counts agree, else averaged over heads.
- ``loss``: ``mse`` (default) or ``cosine``; ``weight`` (default 1.0) multiplies it.

``None`` (the default) matches the embeddings and each student layer with the teacher layer it
would be initialised from (``layer_map``), hidden MSE at ``lambda_distill``.
"""
from dataclasses import dataclass

from ner_compress.compress.distill_losses import FEATURE_LOSSES, attention_loss
from ner_compress.core.errors import UserError

FIELD = "intermediate_matches"
FEATURES = ("hidden", "attention")
REQUIRED = ("student_layer", "teacher_layer", "feature")
DEFAULTS = {"loss": "mse", "weight": 1.0}


@dataclass(frozen=True)
class Match:
    student_layer: int
    teacher_layer: int
    feature: str
    loss: str = "mse"
    weight: float = 1.0

    @property
    def name(self):
        return f"{self.feature}_{self.loss}_s{self.student_layer}_t{self.teacher_layer}"


def layer_map(student_layers, teacher_layers):
    """The teacher encoder layer (0-based) behind each student layer: every k-th, ending with the
    teacher's last layer (PKD-skip), so the classifier keeps the representation it was trained on."""
    return [int((i + 1) * teacher_layers / student_layers + 0.5) - 1 for i in range(student_layers)]


def default_matches(student_layers, teacher_layers, weight):
    layers = layer_map(student_layers, teacher_layers)
    return [Match(0, 0, "hidden", "mse", weight)] + [Match(i + 1, j + 1, "hidden", "mse", weight)
                                                      for i, j in enumerate(layers)]


def _layer_range(feature, layers):
    return (0 if feature == "hidden" else 1), layers


def _check_layer(where, key, value, feature, layers, model):
    low, high = _layer_range(feature, layers)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        what = "0 = embeddings .. " if feature == "hidden" else "1 .. "
        raise UserError(f"{where}.{key} {value!r}: the {model} has {layers} layers ({feature} layers are "
                        f"{what}{high})")


def parse_match(where, entry, student_layers, teacher_layers):
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping with {', '.join(REQUIRED)}, loss, weight; got {entry!r}")
    unknown = sorted(set(entry) - set(REQUIRED) - set(DEFAULTS))
    missing = [k for k in REQUIRED if k not in entry]
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
        raise UserError(f"{where}: {problem}; a match has {', '.join(REQUIRED)}, loss, weight")
    spec = {**DEFAULTS, **entry}
    if spec["feature"] not in FEATURES:
        raise UserError(f"{where}.feature {spec['feature']!r}: use {' or '.join(FEATURES)}")
    if spec["loss"] not in FEATURE_LOSSES:
        raise UserError(f"{where}.loss {spec['loss']!r}: use {' or '.join(FEATURE_LOSSES)}")
    weight = spec["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise UserError(f"{where}.weight {weight!r}: must be a number >= 0")
    _check_layer(where, "student_layer", spec["student_layer"], spec["feature"], student_layers, "student")
    _check_layer(where, "teacher_layer", spec["teacher_layer"], spec["feature"], teacher_layers, "teacher")
    return Match(spec["student_layer"], spec["teacher_layer"], spec["feature"], spec["loss"], float(weight))


def parse_matches(spec, student_layers, teacher_layers, default_weight):
    """``spec`` from the config as a list of ``Match``; anything that cannot map is a one-line UserError."""
    if spec is None:
        return default_matches(student_layers, teacher_layers, default_weight)
    if not isinstance(spec, list):
        raise UserError(f"{FIELD}: expected a list of {{{', '.join(REQUIRED)}, loss, weight}}, got {spec!r}")
    matches = [parse_match(f"{FIELD}[{i}]", entry, student_layers, teacher_layers) for i, entry in enumerate(spec)]
    names = [m.name for m in matches]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{FIELD}: {duplicate} is listed twice; give it one entry with the summed weight")
    return matches


def features(recorded, match, student):
    """The feature ``match`` names, from a ``distill_losses.FeatureRecorder`` of the student or the teacher."""
    layer = match.student_layer if student else match.teacher_layer
    return recorded.hidden(layer) if match.feature == "hidden" else recorded.attention(layer)


def match_parts(matches, student, teacher, mask, count, projections=None):
    """{match name: (weight, loss)} of the matches between two recorded models; hidden states of the student
    go through ``projections[name]`` where it has one (another hidden size)."""
    parts = {}
    for m in matches:
        s, t = features(student, m, True), features(teacher, m, False)
        if m.feature == "attention":
            loss = attention_loss(m.loss, s, t, mask, count)
        else:
            s = projections[m.name](s) if projections and m.name in projections else s
            loss = FEATURE_LOSSES[m.loss](s, t, mask, count)
        parts[m.name] = (m.weight, loss)
    return parts
