"""Per-layer widths under a latency budget: each layer keeps its most important heads and FFN neurons (the
leading ones after ``unit_importance.reorder_by_importance``), and how many is chosen for the whole model at
once, maximising the Fisher importance kept while the predicted latency stays within the budget.

That is a multiple-choice knapsack (one choice per layer part, costs from the latency table), solved exactly by
dynamic programming over the budget cut into ``RESOLUTION`` steps; costs are rounded up, so a plan found is
never over budget. Fisher importance ranks units but is only a second-order guess at what a whole cut costs,
and heads and neurons interact, so ``candidate_plans`` returns a few plans (heads weighted against neurons a few
ways) for the caller to score on dev. Plain numpy: no paddle.
"""
from dataclasses import dataclass

import numpy as np

from ner_compress.core.errors import UserError

RESOLUTION = 2000
HEAD_WEIGHTS = (0.5, 1.0, 2.0)  # heads' importance against neurons': the candidates' spread


@dataclass(frozen=True)
class Plan:
    """Heads and FFN neurons each encoder layer keeps, with its predicted latency and the importance it keeps."""
    heads: tuple
    neurons: tuple
    predicted_ms: float = 0.0
    kept_importance: float = 0.0

    def describe(self):
        return f"heads {list(self.heads)}, neurons {list(self.neurons)}"


def kept_importance(sorted_importance, kept):
    """Importance a plan keeps: the leading ``kept[i]`` values of layer i (rows sorted most important first)."""
    return float(sum(row[:k].sum() for row, k in zip(sorted_importance, kept)))


def best_choices(groups, budget, resolution=RESOLUTION):
    """One option per group maximising the summed value with summed cost <= ``budget``; ``groups`` is a list of
    lists of (value, cost). Returns the chosen option index per group, or None when nothing fits."""
    step = budget / resolution
    if step <= 0:
        return None
    best = np.full(resolution + 1, -np.inf)
    best[0] = 0.0
    picks = []
    for options in groups:
        new = np.full(resolution + 1, -np.inf)
        pick = np.full(resolution + 1, -1)
        for index, (value, cost) in enumerate(options):
            units = int(np.ceil(cost / step - 1e-9))
            if units > resolution:
                continue
            shifted = np.full(resolution + 1, -np.inf)
            shifted[units:] = best[: resolution + 1 - units] + value
            better = shifted > new
            new[better], pick[better] = shifted[better], index
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        return None
    chosen, units = [], int(np.argmax(best))
    for options, pick in zip(reversed(groups), reversed(picks)):
        index = int(pick[units])
        chosen.append(index)
        units -= int(np.ceil(options[index][1] / step - 1e-9))
    return chosen[::-1]


def plan_for_budget(head_importance, neuron_importance, neuron_choices, table, budget_ms, head_weight=1.0):
    """The plan keeping the most importance (heads' weighted by ``head_weight``) within ``budget_ms``, or None."""
    layers, max_heads = head_importance.shape
    head_options = [[(head_weight * row[:h].sum(), table.attention(h)) for h in range(1, max_heads + 1)]
                    for row in head_importance]
    neuron_options = [[(row[:n].sum(), table.ffn(n)) for n in neuron_choices] for row in neuron_importance]
    chosen = best_choices(head_options + neuron_options, budget_ms - table.rest_ms)
    if chosen is None:
        return None
    heads = tuple(index + 1 for index in chosen[:layers])
    neurons = tuple(neuron_choices[index] for index in chosen[layers:])
    return Plan(heads, neurons, table.predict(heads, neurons),
                kept_importance(head_importance, heads) + kept_importance(neuron_importance, neurons))


def candidate_plans(head_importance, neuron_importance, neuron_choices, table, budget_ms, weights=HEAD_WEIGHTS):
    """The distinct plans of ``plan_for_budget`` for each head weight, refused in one line when none fits."""
    plans = []
    for weight in weights:
        plan = plan_for_budget(head_importance, neuron_importance, neuron_choices, table, budget_ms, weight)
        if plan is not None and all((plan.heads, plan.neurons) != (p.heads, p.neurons) for p in plans):
            plans.append(plan)
    if not plans:
        smallest = table.predict([1] * len(head_importance), [min(neuron_choices)] * len(head_importance))
        raise UserError(f"latency budget {budget_ms:.3f} ms: no sub-network meets it (the smallest, one head and "
                        f"{min(neuron_choices)} neurons a layer, is predicted at {smallest:.3f} ms); raise the budget")
    return plans
