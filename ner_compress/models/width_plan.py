"""What a sub-model keeps of each encoder layer: whole attention heads and feed-forward neurons.

A ``WidthPlan`` gives every encoder layer its own head count and FFN neuron count; the hidden size and the
head size stay. A width ``w`` (``width_plan``) is the uniform case: ``w`` of the heads (snapped to whole
heads) and the same share of the neurons in every layer. ``layer_plan`` takes per-layer counts. Heads and
neurons are importance-ordered, so every layer keeps its leading ones. Supernet, export, the NER classes
and the benchmark's FLOP model all cut by one plan. Plain arithmetic on a config: no paddle.

A sub-model's config records its plan (``LAYER_HEADS``, ``LAYER_NEURONS``), so ``save_pretrained`` /
``from_pretrained`` round-trip its shape; configs of the previous format carry ``width_mult`` instead.
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from ner_compress.core.errors import UserError
from ner_compress.core.layout import width_key

LAYER_HEADS, LAYER_NEURONS = "layer_heads", "layer_neurons"  # what a sub-model's config.json records
LEGACY_WIDTH = "width_mult"  # the previous format: one width for every layer
PLAN_KEYS = (LAYER_HEADS, LAYER_NEURONS, LEGACY_WIDTH)


@dataclass(frozen=True)
class WidthPlan:
    """Heads and FFN neurons kept in each encoder layer, of ``num_heads`` heads of ``head_dim``."""
    layer_heads: Tuple[int, ...]
    layer_neurons: Tuple[int, ...]
    num_heads: int
    head_dim: int
    intermediate_size: int
    requested: Optional[float] = None  # the width asked for (rounded by ``width_key``); None: per-layer counts

    @property
    def num_layers(self):
        return len(self.layer_heads)

    @property
    def uniform(self):
        return len(set(self.layer_heads)) == 1 and len(set(self.layer_neurons)) == 1

    @property
    def full(self):
        return set(self.layer_heads) == {self.num_heads} and set(self.layer_neurons) == {self.intermediate_size}

    @property
    def effective(self):
        """The share of all heads kept (a uniform plan: heads / num_heads)."""
        return sum(self.layer_heads) / (self.num_heads * self.num_layers)

    def attention_widths(self):
        """Columns of each layer's q/k/v projections: whole heads only."""
        return [heads * self.head_dim for heads in self.layer_heads]

    # a uniform plan's one count per layer; a per-layer plan has none (use layer_heads / layer_neurons)
    @property
    def heads(self):
        return self._one(self.layer_heads, "heads")

    @property
    def neurons(self):
        return self._one(self.layer_neurons, "neurons")

    @property
    def attention_width(self):
        return self.heads * self.head_dim

    def _one(self, counts, what):
        if len(set(counts)) != 1:
            raise ValueError(f"a per-layer plan has no single {what} count: {list(counts)}")
        return counts[0]

    def record(self):
        """How the plan cut the model, for manifests."""
        return {"width_mult": self.requested, "effective_width_mult": self.effective,
                "layer_heads": list(self.layer_heads), "layer_ffn_neurons": list(self.layer_neurons),
                "num_heads": self.num_heads}


def _sizes(config):
    num_heads = int(config.num_attention_heads)
    return num_heads, int(config.hidden_size) // num_heads, int(config.intermediate_size), int(
        config.num_hidden_layers)


def width_plan(config, width):
    """The one rule for a width: heads = ``width`` x heads rounded to the nearest whole head
    (1.0 0.8333 0.6667 0.5 on 12 heads: 12, 10, 8, 6), neurons in the same effective ratio, in every layer.

    The width is rounded first as directories are named (``width_key``: 0.83333 is 0.8333), so a width
    names one directory and one plan."""
    num_heads, head_dim, intermediate, layers = _sizes(config)
    rounded = width_key(width)
    heads = int(math.floor(num_heads * rounded + 0.5))
    if not 0 < rounded <= 1 or heads < 1:
        raise UserError(f"--width_mult {width}: keeps no attention head of {num_heads} (widths must be in "
                        f"[{0.5 / num_heads:.3g}, 1] for this model)")
    neurons = int(math.floor(intermediate * heads / num_heads + 0.5))
    return WidthPlan((heads,) * layers, (neurons,) * layers, num_heads, head_dim, intermediate, rounded)


def layer_plan(config, heads, neurons=None, source="plan"):
    """A plan with each encoder layer's own head count and FFN neuron count (``neurons`` None: each layer's
    neurons in its heads' ratio). ``source`` names where the counts came from in an error."""
    num_heads, head_dim, intermediate, layers = _sizes(config)
    heads = _counts(heads, layers, num_heads, f"{source} heads", "attention heads")
    if neurons is None:
        neurons = [int(math.floor(intermediate * h / num_heads + 0.5)) for h in heads]
    neurons = _counts(neurons, layers, intermediate, f"{source} neurons", "FFN neurons")
    return WidthPlan(tuple(heads), tuple(neurons), num_heads, head_dim, intermediate)


def _counts(counts, layers, most, what, unit):
    """``counts`` as ints, one per layer, each in [1, most]; else a one-line error naming ``what``."""
    try:
        counts = [int(c) for c in counts]
    except (TypeError, ValueError):
        raise UserError(f"{what} {counts!r}: give a list of whole numbers, one per encoder layer")
    if len(counts) != layers:
        raise UserError(f"{what} {counts}: {len(counts)} counts for {layers} encoder layers; give one per layer")
    bad = [c for c in counts if not 1 <= c <= most]
    if bad:
        raise UserError(f"{what} {counts}: {bad[0]} is out of range; each layer keeps 1 to {most} {unit}")
    return counts


def plan_of(config, source="config.json"):
    """The plan a config records: per-layer counts, else the previous format's ``width_mult``, else full."""
    if getattr(config, LAYER_HEADS, None) is not None:
        return layer_plan(config, getattr(config, LAYER_HEADS), getattr(config, LAYER_NEURONS, None), source)
    return width_plan(config, float(getattr(config, LEGACY_WIDTH, None) or 1.0))


def recorded(config, plan):
    """``config`` saying ``plan``'s shape (a copy when it changes): per-layer counts, none for a full plan.
    A previous-format ``width_mult`` is replaced, so a model saved again writes the current format."""
    if (plan.num_layers, plan.num_heads) != (int(config.num_hidden_layers), int(config.num_attention_heads)):
        raise ValueError(f"a plan for {plan.num_layers} layers of {plan.num_heads} heads cannot cut this config")
    keys = {} if plan.full else {LAYER_HEADS: list(plan.layer_heads), LAYER_NEURONS: list(plan.layer_neurons)}
    if all(getattr(config, k, None) == keys.get(k) for k in PLAN_KEYS):
        return config
    config = copy.deepcopy(config)
    for key in PLAN_KEYS:
        config.__dict__.pop(key, None)
    for key, value in keys.items():
        setattr(config, key, value)
    return config


def without_plan(config):
    """``config`` as a full model's (a student built from a sub-model's config starts unshrunk)."""
    return type(config)(**{k: v for k, v in config.to_dict().items() if k not in PLAN_KEYS})
