"""paddle2onnx's graph rewritten so ONNX Runtime's transformer optimizer fuses it: counts and parity."""
import numpy as np
import pytest
from conftest import TINY_LABELS


def static_and_onnx(model, tmp_path, vocab_file):
    """``model`` saved as export saves it (static graph, then paddle2onnx); returns (static dir, onnx path)."""
    from ner_compress.deploy import export
    from ner_compress.deploy.backends import export_onnx

    static = tmp_path / "static"
    export.save_static(model, str(static), TINY_LABELS, 64, vocab_file)
    (tmp_path / "onnx").mkdir()
    return str(static), export_onnx(str(static), str(tmp_path / "onnx" / "model.onnx"))


def padded_inputs():
    """Rows of different lengths, [PAD] (id 0) at the end and one in the middle of a row."""
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 21128, (3, 40)).astype("int64")
    ids[1, 25:] = 0
    ids[2, 7] = 0
    return ids, np.zeros_like(ids)


def model_of(family, width=1.0):
    import paddle

    from ner_compress.models.families import FAMILIES

    config_class, model_class, _ = FAMILIES[family]
    extra = {"use_task_id": True, "task_type_vocab_size": 3} if family == "ernie" else {}
    paddle.seed(7)
    model = model_class(config_class(vocab_size=21128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=len(TINY_LABELS), width_mult=width, **extra))
    model.eval()
    return model


@pytest.mark.parametrize("family, width, heads, embed_layer_norm", [
    ("bert", 1.0, 4, 1),
    ("bert", 0.5, 2, 1),  # a width sub-model: 2 heads x 8 = 16 q/k/v columns on a 32 hidden size
    ("ernie", 1.0, 4, 0),  # four embeddings (task type too): no EmbedLayerNormalization pattern
])
def test_fused_graph_has_every_bert_fusion_and_keeps_parity(tmp_path, vocab_file, family, width, heads,
                                                            embed_layer_norm):
    from ner_compress.deploy import onnx_graph
    from ner_compress.deploy.backends import OnnxTagger, StaticTagger

    static, onnx_path = static_and_onnx(model_of(family, width), tmp_path, vocab_file)
    fused_path = str(tmp_path / "onnx" / "model.opt.onnx")
    result = onnx_graph.fuse(onnx_path, fused_path, heads, heads * 8)
    assert result["rewrites"]["scales_moved"] == 2 and result["rewrites"]["masks_rewritten"] == 1
    counts = result["fused"]
    assert counts["Attention"] == 2 and counts["SkipLayerNormalization"] == 4 and counts["BiasGelu"] == 2
    assert counts["EmbedLayerNormalization"] == embed_layer_norm
    ids, types = padded_inputs()
    fused = OnnxTagger(static, fused_path).logits(ids, types)
    assert np.abs(fused - StaticTagger(static).logits(ids, types)).max() < 1e-4
    # the fused graph really is different: no separate Softmax is left in it
    import onnx

    assert "Softmax" not in {n.op_type for n in onnx.load(fused_path).graph.node}


def test_unrewritten_graph_gets_no_attention(tmp_path, vocab_file):
    """Why the rewrite exists: the optimizer on paddle2onnx's graph as it comes fuses no Attention."""
    from onnxruntime.transformers.optimizer import optimize_model

    from ner_compress.deploy import onnx_graph

    import onnx

    _, onnx_path = static_and_onnx(model_of("bert"), tmp_path, vocab_file)
    stats = optimize_model(onnx_path, model_type="bert", num_heads=4, hidden_size=32,
                           optimization_options=onnx_graph.fusion_options(), opt_level=0).get_fused_operator_statistics()
    assert stats["Attention"] == 0
    # paddle2onnx 1.2.11 writes weights as Constant nodes (no BiasGelu either); 2.x folds them into
    # initializers with Polygraphy, and then BiasGelu fuses as it is
    weights_as_nodes = any(n.op_type == "Constant" for n in onnx.load(onnx_path).graph.node)
    assert (stats["BiasGelu"] == 0) == weights_as_nodes, stats


def test_a_failing_optimizer_falls_back_with_the_reason_recorded(tmp_path, vocab_file, monkeypatch):
    from ner_compress.deploy import onnx_graph, onnx_variants
    from ner_compress.deploy.parity import check_parity
    from ner_compress.models.width_plan import width_plan

    model = model_of("bert", 0.5)
    static, onnx_path = static_and_onnx(model, tmp_path, vocab_file)

    def broken(*args):
        open(str(tmp_path / "onnx" / "model.opt.onnx"), "w").write("half-written")
        raise AssertionError("qkv shapes")

    monkeypatch.setattr(onnx_graph, "fuse", broken)
    ids, types = padded_inputs()
    meta = onnx_variants.fused_variant(static, onnx_path, width_plan(model.config, 0.5), 2,
                                       lambda logits: check_parity("x", 0, logits), (ids, types))
    assert meta == {"file": None, "fallback_reason": "transformer optimizer failed (AssertionError: qkv shapes)"}
    assert not (tmp_path / "onnx" / "model.opt.onnx").exists()


def test_a_fused_graph_that_breaks_parity_is_not_kept(tmp_path, vocab_file):
    from ner_compress.deploy import onnx_variants
    from ner_compress.deploy.backends import StaticTagger
    from ner_compress.deploy.parity import check_parity
    from ner_compress.models.width_plan import width_plan

    model = model_of("bert")
    static, onnx_path = static_and_onnx(model, tmp_path, vocab_file)
    ids, types = padded_inputs()
    wrong = StaticTagger(static).logits(ids, types) + 1e-3  # a reference the fused graph cannot match
    meta = onnx_variants.fused_variant(static, onnx_path, width_plan(model.config, 1.0), 2,
                                       lambda logits: check_parity("paddle", wrong, logits), (ids, types))
    assert meta["file"] is None and meta["fallback_reason"].startswith("export parity failed: fused onnx runtime")
    assert not (tmp_path / "onnx" / "model.opt.onnx").exists()
