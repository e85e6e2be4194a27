"""Accuracy-aware INT8 on a tiny graph with one node made sensitive on purpose: the search leaves that node,
and only that node, in FP32."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ner_compress.deploy import int8_search

VOCAB, HIDDEN, LABELS, PAD = 20, 8, 4, 0


def sensitive_graph(path):
    """Embeddings -> ``plain`` -> ``outlier`` -> ``sensitive`` -> logits. ``outlier`` (a Mul, never quantized)
    makes one channel 1000x the others and ``sensitive`` ignores that channel, but one int8 scale for all of
    ``sensitive``'s input rounds the channels that matter to zero; ``plain`` sees ordinary values."""
    rng = np.random.default_rng(0)
    sensitive = rng.normal(size=(HIDDEN, LABELS)).astype("float32")
    sensitive[0] = 0
    weights = {"words": rng.normal(size=(VOCAB, HIDDEN)), "types": rng.normal(size=(2, HIDDEN)) * 0.1,
               "plain_w": rng.normal(size=(HIDDEN, HIDDEN)), "outlier_scale": [1000] + [1] * (HIDDEN - 1),
               "sensitive_w": sensitive}
    nodes = [helper.make_node("Gather", ["words", "input_ids"], ["w"], name="word_embeddings"),
             helper.make_node("Gather", ["types", "token_type_ids"], ["t"], name="type_embeddings"),
             helper.make_node("Add", ["w", "t"], ["e"], name="add"),
             helper.make_node("MatMul", ["e", "plain_w"], ["p"], name="plain"),
             helper.make_node("Mul", ["p", "outlier_scale"], ["h"], name="outlier"),
             helper.make_node("MatMul", ["h", "sensitive_w"], ["logits"], name="sensitive")]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "length"])
           for n in ("input_ids", "token_type_ids")]
    graph = helper.make_graph(nodes, "sensitive", ids,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "length", LABELS])],
                              [numpy_helper.from_array(np.asarray(v, "float32"), n) for n, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def feeds(seed, batches=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        ids = rng.integers(1, VOCAB, size=(8, 16))
        ids[:, 12:] = PAD
        out.append({"input_ids": ids, "token_type_ids": np.zeros_like(ids)})
    return out


def logits_for(path):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda input_ids, token_type_ids: session.run(None, {"input_ids": input_ids,
                                                                "token_type_ids": token_type_ids})[0]


class LabelAgreement:
    """A stand-in for dev parity: "F1" is the share of real positions whose best label FP32 and INT8 agree on."""

    def __init__(self, fp32_path, held_out):
        self.held_out = held_out
        self.fp32 = self.labels(logits_for(fp32_path))

    def labels(self, fn):
        return np.concatenate([fn(f["input_ids"], f["token_type_ids"]).argmax(-1)[f["input_ids"] != PAD]
                               for f in self.held_out])

    def __call__(self, int8_logits):
        same = 100 * float(np.mean(self.labels(int8_logits) == self.fp32))
        return {"dev_f1_fp32": 100.0, "dev_f1_int8": same, "f1_drop_points": 100 - same,
                "entity_agreement_f1": same, "fp32_entities": 0, "int8_entities": 0}


def op_type_of(path):
    return {n.name: n.op_type for n in onnx.load(path).graph.node}


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_the_node_made_sensitive_stays_fp32_and_the_rest_is_quantized(tmp_path, method):
    fp32 = sensitive_graph(tmp_path / "model.onnx")
    search = int8_search.Search(fp32, feeds(1), PAD, logits_for, LabelAgreement(fp32, feeds(2)), max_drop=2.0)
    try:
        record = int8_search.best_copy(search, [method], True, feeds(3), str(tmp_path / "model.int8.onnx"))
    finally:
        search.close()
    whole, *searched = record["tried"]
    assert whole["configuration"] == "whole graph" and whole["f1_drop_points"] > 10  # really sensitive
    assert record["sensitivity"][method][0]["layer"] == "sensitive"  # ranked most sensitive
    chosen = record["chosen"]
    assert chosen["nodes_fp32"] == ["sensitive"] and chosen["configuration"] == "1 node kept in FP32 (sensitive)"
    assert chosen["f1_drop_points"] <= 2.0 and chosen == searched[-1] and chosen["speedup_vs_fp32_b32"] > 0
    ops = op_type_of(str(tmp_path / "model.int8.onnx"))
    assert ops["sensitive"] == "MatMul"  # FP32, untouched
    assert "plain" not in ops or method == "static"  # dynamic replaces it by an integer MatMul
    quantized = {"dynamic": "MatMulInteger", "static": "DequantizeLinear"}[method]
    assert quantized in ops.values()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]  # scratch removed


def test_no_search_when_the_whole_graph_passes_and_none_when_asked_not_to(tmp_path):
    fp32 = sensitive_graph(tmp_path / "model.onnx")
    search = int8_search.Search(fp32, feeds(1), PAD, logits_for, LabelAgreement(fp32, feeds(2)), max_drop=2.0)
    try:
        record = int8_search.best_copy(search, ["dynamic"], False, feeds(3), str(tmp_path / "model.int8.onnx"))
    finally:
        search.close()
    assert record["chosen"] is None and len(record["tried"]) == 1 and record["sensitivity"] == {}
    assert not (tmp_path / "model.int8.onnx").exists()


def test_layers_are_read_off_the_layer_norms():
    """Two norms per post-LN layer: embeddings before the first, the classifier after the last."""
    def node(op, name):
        return helper.make_node(op, [], [name + "_out"], name=name)

    ops = [("Gather", "embed"), ("LayerNormalization", "ln0"), ("Attention", "att0"), ("MatMul", "out0"),
           ("SkipLayerNormalization", "ln1"), ("MatMul", "ffn0"), ("SkipLayerNormalization", "ln2"),
           ("Attention", "att1"), ("SkipLayerNormalization", "ln3"), ("MatMul", "ffn1"),
           ("SkipLayerNormalization", "ln4"), ("MatMul", "classifier")]
    model = helper.make_model(helper.make_graph([node(*o) for o in ops], "g", [], []))
    assert int8_search.layer_groups(model, "dynamic") == [
        ("embeddings", ["embed"]), ("layer 0", ["att0", "out0", "ffn0"]), ("layer 1", ["att1", "ffn1"]),
        ("head", ["classifier"])]
    assert int8_search.layer_groups(model, "static")[0] == ("layer 0", ["out0", "ffn0"])  # Attention stays FP32


def test_when_no_layer_passes_alone_the_least_lossy_on_dev_are_combined(tmp_path, monkeypatch):
    fp32 = sensitive_graph(tmp_path / "model.onnx")
    search = int8_search.Search(fp32, feeds(1), PAD, logits_for, judge=None, max_drop=0.5)
    ranked = [(name, [name]) for name in "abcdef"]  # by calibration KL
    drops = {(): 3.0, ("a",): 2.0, ("b",): 1.0, ("c",): 1.5, ("b", "c"): 0.4}  # on dev
    tried = []

    def try_copy(method, layers=()):
        names = tuple(name for name, _ in layers)
        tried.append(names)
        return {"f1_drop_points": drops.get(names, 9.0), "passed": drops.get(names, 9.0) <= 0.5, "layers": names}

    monkeypatch.setattr(search, "ranked_layers", lambda method: ranked)
    monkeypatch.setattr(search, "try_copy", try_copy)
    try:
        assert search.search("dynamic")["layers"] == ("b", "c")
    finally:
        search.close()
    assert tried == [(), ("a",), ("b",), ("c",), ("b", "c")]  # the 3 most sensitive alone, then b (least lossy) + c
