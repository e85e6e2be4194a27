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
    worth: float = 0.0  # the summed values of its choices (``Values``)

    def describe(self):
        return f"heads {list(self.heads)}, neurons {list(self.neurons)}"


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


@dataclass
class Values:
    """What keeping each choice is worth, per layer: ``heads[i][h - 1]`` for h heads, ``neurons[i][k]`` for
    ``neuron_choices[k]`` neurons (higher is better). ``source`` says how they were measured."""
    heads: np.ndarray
    neurons: np.ndarray
    neuron_choices: list
    source: str

    @classmethod
    def from_importance(cls, head_importance, neuron_importance, neuron_choices):
        """Sorted per-unit importances (Fisher): a choice is worth the importance of the units it keeps."""
        heads = np.cumsum(head_importance, axis=1)
        neurons = np.cumsum(neuron_importance, axis=1)[:, np.asarray(neuron_choices) - 1]
        return cls(heads, neurons, list(neuron_choices), "fisher")


def plan_for_budget(values, table, budget_ms, head_weight=1.0):
    """The plan worth most (heads' values weighted by ``head_weight``) within ``budget_ms``, or None."""
    layers, max_heads = values.heads.shape
    head_options = [[(head_weight * row[h - 1], table.attention(h)) for h in range(1, max_heads + 1)]
                    for row in values.heads]
    neuron_options = [[(row[k], table.ffn(n)) for k, n in enumerate(values.neuron_choices)] for row in values.neurons]
    chosen = best_choices(head_options + neuron_options, budget_ms - table.rest_ms)
    if chosen is None:
        return None
    heads = tuple(index + 1 for index in chosen[:layers])
    neurons = tuple(values.neuron_choices[index] for index in chosen[layers:])
    worth = sum(row[h - 1] for row, h in zip(values.heads, heads)) + sum(
        row[values.neuron_choices.index(n)] for row, n in zip(values.neurons, neurons))
    return Plan(heads, neurons, table.predict(heads, neurons), float(worth))


def distinct(plans, key=lambda plan: plan):
    """``plans`` without None and without repeats of the same heads and neurons, first kept, in order."""
    seen, out = set(), []
    for item in plans:
        plan = key(item) if item is not None else None
        if plan is not None and (plan.heads, plan.neurons) not in seen:
            seen.add((plan.heads, plan.neurons))
            out.append(item)
    return out


def candidate_plans(values, table, budget_ms, weights=HEAD_WEIGHTS):
    """The distinct plans of ``plan_for_budget`` for each head weight, refused in one line when none fits."""
    plans = distinct([plan_for_budget(values, table, budget_ms, weight) for weight in weights])
    if not plans:
        layers, smallest_ffn = len(values.heads), min(values.neuron_choices)
        smallest = table.predict([1] * layers, [smallest_ffn] * layers)
        raise UserError(f"latency budget {budget_ms:.3f} ms: no sub-network meets it (the smallest, one head and "
                        f"{smallest_ffn} neurons a layer, is predicted at {smallest:.3f} ms); raise the budget")
    return plans
