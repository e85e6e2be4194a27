"""What a width keeps of a model: whole attention heads, and feed-forward neurons in the same ratio.

A width-``w`` sub-model keeps the hidden size and the head size; it keeps ``w`` of the heads (snapped to
whole heads) and the same share of the feed-forward neurons. Supernet, export, the NER classes and the
benchmark's FLOP model all cut by this one plan. Plain arithmetic on a config: no paddle.
"""
import math
from dataclasses import dataclass

from ner_compress.core.errors import UserError


@dataclass(frozen=True)
class WidthPlan:
    """What a width keeps of every encoder layer: whole heads, and FFN neurons in the same ratio."""
    requested: float
    heads: int
    num_heads: int
    head_dim: int
    neurons: int

    @property
    def effective(self):
        return self.heads / self.num_heads

    @property
    def attention_width(self):
        """Columns of the q/k/v projections: whole heads only."""
        return self.heads * self.head_dim


def width_plan(config, width):
    """The one rule for a width: heads = ``width`` x heads rounded to the nearest whole head
    (1.0 0.8333 0.6667 0.5 on 12 heads: 12, 10, 8, 6), neurons in the same effective ratio.

    Supernet, export and ``PrunedBertForTokenClassification`` all cut by this plan, so a width
    that does not land on whole heads is snapped the same way everywhere."""
    num_heads = int(config.num_attention_heads)
    heads = int(math.floor(num_heads * float(width) + 0.5))
    if not 0 < width <= 1 or heads < 1:
        raise UserError(f"--width_mult {width}: keeps no attention head of {num_heads} (widths must be in "
                        f"[{0.5 / num_heads:.3g}, 1] for this model)")
    neurons = int(math.floor(config.intermediate_size * heads / num_heads + 0.5))
    return WidthPlan(float(width), heads, num_heads, config.hidden_size // num_heads, neurons)
