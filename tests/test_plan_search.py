"""Latency-budget search parts: the latency table (measured, cached, re-measured), Fisher importance and the
reorder it drives, and the knapsack that picks per-layer widths."""
import itertools
import os

import numpy as np
import paddle
import pytest

from ner_compress.compress.plan_search import Values, best_choices, candidate_plans, plan_for_budget
from ner_compress.compress.unit_importance import fisher_importance, reorder_by_importance
from ner_compress.core.errors import UserError
from ner_compress.measure import latency_table as lt
from ner_compress.models.modeling import numpy_logits
from test_reconstruction import bert, windows
from ner_compress.data.corpus import collate
from ner_compress.compress.training import to_tensors

TINY_SHAPE = lt.LayerShape(hidden=16, head_dim=4, heads=4, intermediate=32)


class FixedTable:
    """A latency table with made-up costs: heads cost 1 each, neurons 0.1 each, the rest 2."""
    rest_ms = 2.0

    def attention(self, heads):
        return float(heads)

    def ffn(self, neurons):
        return 0.1 * neurons

    def predict(self, heads, neurons):
        return self.rest_ms + sum(map(self.attention, heads)) + sum(map(self.ffn, neurons))


def test_best_choices_matches_brute_force():
    rng = np.random.RandomState(0)
    groups = [[(float(rng.rand()), float(rng.rand() * 3)) for _ in range(4)] for _ in range(4)]
    for budget in (0.1, 2.0, 4.0, 7.5):
        chosen = best_choices(groups, budget, resolution=4000)
        feasible = [c for c in itertools.product(range(4), repeat=4)
                    if sum(groups[g][i][1] for g, i in enumerate(c)) <= budget]
        if not feasible:
            assert chosen is None
            continue
        best = max(sum(groups[g][i][0] for g, i in enumerate(c)) for c in feasible)
        got = sum(groups[g][i][0] for g, i in enumerate(chosen))
        assert sum(groups[g][i][1] for g, i in enumerate(chosen)) <= budget
        assert got == pytest.approx(best, abs=1e-3)


def test_plan_spends_the_budget_where_importance_is():
    heads = np.array([[5.0, 4, 3, 2], [0.4, 0.3, 0.2, 0.1]])  # layer 0's heads matter, layer 1's hardly
    neurons = np.full((2, 8), 0.01)
    plan = plan_for_budget(Values.from_importance(heads, neurons, [2, 4, 8]), FixedTable(), budget_ms=2 + 5 + 0.4)
    assert plan.predicted_ms <= 2 + 5 + 0.4
    assert plan.heads[0] > plan.heads[1]


def test_no_plan_within_the_budget_is_one_line():
    with pytest.raises(UserError) as err:
        values = Values.from_importance(np.ones((2, 4)), np.ones((2, 8)), [2, 4, 8])
        candidate_plans(values, FixedTable(), budget_ms=2.5)
    assert "no sub-network meets it" in str(err.value) and "\n" not in str(err.value)


def tiny_batches():
    return [to_tensors(collate(windows(48)[i: i + 8], 0)) for i in range(0, 48, 8)]


def test_fisher_reorder_keeps_the_function_and_sorts_the_units():
    model = bert(layers=2)
    batch = tiny_batches()[0]
    before = numpy_logits(model, batch["input_ids"].numpy(), batch["token_type_ids"].numpy())
    heads, neurons = fisher_importance(model, tiny_batches())
    assert heads.shape == (2, 4) and neurons.shape == (2, 64) and (heads > 0).all()
    sorted_heads, sorted_neurons = reorder_by_importance(model, heads, neurons)
    after = numpy_logits(model, batch["input_ids"].numpy(), batch["token_type_ids"].numpy())
    np.testing.assert_allclose(after, before, atol=1e-5)  # a permutation of units computes the same
    assert (np.diff(sorted_heads, axis=1) <= 0).all() and (np.diff(sorted_neurons, axis=1) <= 0).all()
    again, _ = fisher_importance(model, tiny_batches())
    np.testing.assert_allclose(again, sorted_heads, rtol=1e-3, atol=1e-12)  # importance moved with its head


def test_masking_the_least_important_head_costs_less_than_the_most():
    model = bert(layers=1)
    heads, _ = fisher_importance(model, tiny_batches())
    losses = []
    for head in (int(np.argmin(heads[0])), int(np.argmax(heads[0]))):
        weight = model.bert.encoder.layers[0].self_attn.out_proj.weight
        saved = weight.numpy().copy()
        cut = saved.copy()
        cut[head * 8:(head + 1) * 8] = 0  # head_dim 32 / 4 heads
        weight.set_value(paddle.to_tensor(cut))
        losses.append(_loss(model))
        weight.set_value(paddle.to_tensor(saved))
    assert losses[0] < losses[1]


def _loss(model):
    from ner_compress.compress.training import token_loss

    with paddle.no_grad():
        return float(sum(token_loss(model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"]),
                                    b["labels"]) for b in tiny_batches()))


def test_part_graphs_run_and_cost_more_when_wider():
    workload = lt.Workload.from_lengths([5, 9, 12, 7], batch_size=2)
    assert workload.shapes == ((2, 7), (2, 12)) and workload.sentences == 4
    for part, width in (("attention", 1), ("attention", 4), ("ffn", 8), ("ffn", 32)):
        assert lt.part_ms(TINY_SHAPE, part, width, workload, threads=1, repeats=1) > 0


def test_latency_table_is_cached_and_measured_again_for_other_threads(tmp_path):
    workload = lt.Workload.from_lengths([5, 9, 12, 7], batch_size=1)
    path = str(tmp_path / "table.json")
    calls = []

    def measure(threads):
        def run():
            calls.append(threads)
            key = lt.machine_key(threads, "onnxruntime", "fp32", workload, TINY_SHAPE)
            return lt.measure_table(TINY_SHAPE, key, lt.onnx_part_timer(TINY_SHAPE, workload, threads),
                                    lambda table: 0.5)
        return run

    key = lt.machine_key(1, "onnxruntime", "fp32", workload, TINY_SHAPE)
    first, cached = lt.cached_table(path, key, measure(1))
    assert not cached and sorted(first.attention_ms) == [1, 2, 3, 4] and first.rest_ms == 0.5
    again, cached = lt.cached_table(path, key, measure(1))
    assert cached and again.to_json() == first.to_json() and calls == [1]
    _, cached = lt.cached_table(path, lt.machine_key(2, "onnxruntime", "fp32", workload, TINY_SHAPE), measure(2))
    assert not cached and calls == [1, 2]
    assert first.predict([4, 4], [32, 32]) > first.predict([1, 1], [8, 8]) > first.rest_ms


def test_a_scaled_table_predicts_every_plan_scaled():
    table = lt.LatencyTable({}, {}, {1: 1.0, 4: 2.5}, {8: 0.5, 32: 2.0}, 0.75)
    faster = table.scaled(0.8)
    for heads, neurons in (([4, 4], [32, 32]), ([1, 4], [8, 32])):
        assert faster.predict(heads, neurons) == pytest.approx(0.8 * table.predict(heads, neurons))
    assert table.rest_ms == 0.75  # the cached table itself is left as measured


def test_a_timing_is_the_lowest_of_its_passes(monkeypatch):
    monkeypatch.setattr(lt.timing, "repeat_seconds", lambda once, repeats: [0.4, 0.2, 0.3][:repeats])
    workload = lt.Workload.from_lengths([5, 9], batch_size=1)
    assert lt.workload_ms(lambda feed: None, [{}, {}], workload, repeats=3) == pytest.approx(100.0)


def test_fisher_importance_is_cached_for_the_same_weights_and_batches_only(tmp_path):
    from ner_compress.compress.searched_model import cached_importance

    model, path = bert(layers=1), str(tmp_path / "importance.npz")
    (heads, neurons), cached = cached_importance(model, tiny_batches(), path)
    assert not cached and os.path.isfile(path)
    (again_heads, again_neurons), cached = cached_importance(model, tiny_batches(), path)
    assert cached and np.array_equal(again_heads, heads) and np.array_equal(again_neurons, neurons)
    _, cached = cached_importance(model, tiny_batches()[:3], path)
    assert not cached  # other batches
    weight = model.bert.encoder.layers[0].linear2.weight
    weight.set_value(weight.numpy() * 1.5)
    _, cached = cached_importance(model, tiny_batches()[:3], path)
    assert not cached  # other weights
