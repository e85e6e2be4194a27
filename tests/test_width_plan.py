"""Width plans: one rounding of a width from flag to directory, and per-layer plans (each encoder layer its own
heads and FFN neurons) built, sliced from a supernet, saved, reloaded, refit, exported and fused."""
import copy
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_LABELS

from ner_compress.core import layout
from ner_compress.core.errors import UserError

HEADS, NEURONS = [4, 2, 1], [64, 20, 8]  # of 4 heads and 64 neurons in each of 3 layers
SHA = "0" * 64


def tiny(family="bert", vocab_size=21128, seed=5):
    """A 3-layer, 4-head, 32-hidden token classifier of ``family`` in eval mode."""
    import paddle

    from ner_compress.models.families import FAMILIES

    config_class, model_class, _ = FAMILIES[family]
    extra = {"electra": {"embedding_size": 16}, "ernie": {"use_task_id": True, "task_type_vocab_size": 3}}
    paddle.seed(seed)
    model = model_class(config_class(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, num_labels=len(TINY_LABELS), initializer_range=0.2,
                                     **extra.get(family, {})))
    model.eval()
    return model


def supernet_of(teacher):
    from paddleslim.nas.ofa import OFA

    from ner_compress.compress import supernet

    ofa_model = OFA(supernet.to_supernet(copy.deepcopy(teacher)), elastic_order=["width"])
    ofa_model.model.eval()
    return ofa_model


def ids(vocab_size, seed=0):
    rng = np.random.RandomState(seed)
    input_ids = rng.randint(5, vocab_size, (3, 11)).astype("int64")
    input_ids[1, 8:] = 0  # [PAD]
    return input_ids, np.zeros_like(input_ids)


def test_bad_per_layer_plans_are_one_line_errors():
    from ner_compress.models.width_plan import layer_plan

    config = tiny("bert", vocab_size=50).config
    for heads, neurons, message in [
        ([4, 2], None, r"plan heads \[4, 2\]: 2 counts for 3 encoder layers; give one per layer"),
        ([4, 0, 2], None, r"plan heads \[4, 0, 2\]: 0 is out of range; each layer keeps 1 to 4 attention heads"),
        ([4, 5, 2], None, r"plan heads \[4, 5, 2\]: 5 is out of range; each layer keeps 1 to 4 attention heads"),
        ([4, 2, 1], [64, 65, 8], r"plan neurons \[64, 65, 8\]: 65 is out of range; each layer keeps 1 to 64 FFN"),
        ([4, "two", 1], None, r"plan heads \[4, 'two', 1\]: give a list of whole numbers, one per encoder layer"),
    ]:
        with pytest.raises(UserError, match=message) as err:
            layer_plan(config, heads, neurons)
        assert "\n" not in str(err.value)


def test_a_width_and_its_per_layer_equivalent_cut_alike():
    from ner_compress.models.width_plan import layer_plan, width_plan

    config = tiny("bert", vocab_size=50).config
    uniform = width_plan(config, 0.5)
    assert uniform.layer_heads == (2, 2, 2) and uniform.heads == 2 and uniform.neurons == 32
    same = layer_plan(config, [2, 2, 2])  # neurons in the heads' ratio
    assert (same.layer_heads, same.layer_neurons, same.uniform) == (uniform.layer_heads, uniform.layer_neurons, True)
    mixed = layer_plan(config, HEADS, NEURONS)
    assert not mixed.uniform and mixed.attention_widths() == [32, 16, 8] and mixed.effective == 7 / 12
    with pytest.raises(ValueError, match="per-layer"):
        mixed.heads  # noqa: B018 -- a per-layer plan has no one head count to misuse


def test_a_width_with_more_decimals_is_the_rounded_widths_plan():
    from ner_compress.models.width_plan import width_plan

    config = SimpleNamespace(num_attention_heads=12, hidden_size=96, intermediate_size=3072, num_hidden_layers=2)
    assert width_plan(config, 0.83333) == width_plan(config, 0.8333)
    assert width_plan(config, 0.83333).requested == 0.8333 and width_plan(config, 0.83333).heads == 10


@pytest.mark.parametrize("family", ["bert", "ernie", "roberta", "electra"])
def test_a_per_layer_plan_slices_from_the_supernet_and_reloads_with_from_pretrained(family, tmp_path):
    from ner_compress.compress.supernet import ofa_logits, set_plan
    from ner_compress.models.encoder_changes import encoder_layers
    from ner_compress.models.families import FAMILIES
    from ner_compress.models.modeling import numpy_logits, sub_model_state
    from ner_compress.models.width_plan import layer_plan

    teacher = tiny(family, vocab_size=80)
    plan = layer_plan(teacher.config, HEADS, NEURONS)
    ofa_model = supernet_of(teacher)
    set_plan(ofa_model, plan)
    model = FAMILIES[family][1](teacher.config, plan=plan)
    model.set_state_dict(sub_model_state(ofa_model.model.state_dict(), model))
    model.eval()
    assert [(layer.self_attn.num_heads, layer.linear1.weight.shape[1]) for layer in encoder_layers(model)] == list(
        zip(HEADS, NEURONS))
    assert not hasattr(teacher.config, "layer_heads")  # the caller's config is not changed
    inputs = ids(80)
    logits = numpy_logits(model, *inputs)
    np.testing.assert_allclose(logits, ofa_logits(ofa_model)(*inputs), atol=1e-5)
    assert np.abs(logits - numpy_logits(teacher, *inputs)).max() > 1e-4  # the cut really is narrower

    model.save_pretrained(str(tmp_path), safe_serialization=True)
    saved = json.load(open(tmp_path / "config.json"))
    assert (saved["layer_heads"], saved["layer_neurons"]) == (HEADS, NEURONS) and "width_mult" not in saved
    reloaded = FAMILIES[family][1].from_pretrained(str(tmp_path))  # the config alone says the shape
    reloaded.eval()
    np.testing.assert_array_equal(numpy_logits(reloaded, *inputs), logits)
    assert reloaded.config.layer_heads == HEADS


def test_a_model_saved_by_the_previous_version_with_width_mult_reloads(tmp_path):
    from ner_compress.models.families import PrunedBertForTokenClassification
    from ner_compress.models.modeling import numpy_logits, sub_model_state
    from ner_compress.models.width_plan import width_plan

    teacher = tiny("bert", vocab_size=80)
    model = PrunedBertForTokenClassification(teacher.config, plan=width_plan(teacher.config, 0.5))
    model.set_state_dict(sub_model_state(teacher.state_dict(), model))
    model.eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    config = json.load(open(tmp_path / "config.json"))
    for key in ("layer_heads", "layer_neurons"):
        config.pop(key)
    json.dump({**config, "width_mult": 0.5}, open(tmp_path / "config.json", "w"))  # the previous format
    reloaded = PrunedBertForTokenClassification.from_pretrained(str(tmp_path))
    reloaded.eval()
    assert reloaded.bert.encoder.layers[2].self_attn.num_heads == 2
    np.testing.assert_array_equal(numpy_logits(reloaded, *ids(80)), numpy_logits(model, *ids(80)))


def test_reconstruction_refits_a_per_layer_cut():
    from test_reconstruction import PROJECTIONS, bert, calibration, logits_gap

    from ner_compress.compress.reconstruction import reconstruct
    from ner_compress.models.families import PrunedBertForTokenClassification
    from ner_compress.models.modeling import sub_model_state
    from ner_compress.models.width_plan import layer_plan

    teacher = bert(layers=3)
    plan = layer_plan(teacher.config, [3, 2, 1])
    model = PrunedBertForTokenClassification(teacher.config, plan=plan)
    model.set_state_dict(sub_model_state(teacher.state_dict(), model))
    model.eval()
    calib = calibration()
    before = logits_gap(model, teacher, calib)
    records = reconstruct(model, teacher, calib, [0, 1, 2])
    assert any(r[p]["applied"] for r in records for p in PROJECTIONS)
    assert logits_gap(model, teacher, calib) < before
    assert [layer.linear2.weight.shape[0] for layer in model.bert.encoder.layers] == list(plan.layer_neurons)


class TinyData:
    """What export reads of the data: labels, vocabulary, and dev windows for parity."""

    def __init__(self, vocab_file):
        from ner_compress.data.corpus import Window

        self.labels, self.vocab_sha256, self.vocab_file = TINY_LABELS, SHA, vocab_file
        self.encoder = SimpleNamespace(pad_id=0)
        rng = np.random.RandomState(1)
        self.dev = [Window(i, 0, np.array([101, *rng.randint(670, 8000, 5 + i), 102]), np.zeros(7 + i, "int64"))
                    for i in range(6)]

    def windows(self, split):
        return self.dev


@pytest.fixture(scope="module")
def supernet_run(tmp_path_factory, vocab_file):
    """A run directory with a finished teacher and a supernet saved at width 0.8333 (``ofa/width_0.8333``)."""
    from ner_compress.compress.supernet import SUPERNET_WEIGHTS
    from ner_compress.core.artifacts import write_manifest
    from ner_compress.core.checkpoint import save_weights
    from ner_compress.core.config import Config

    out = str(tmp_path_factory.mktemp("run"))
    cfg = Config(output_dir=out, onnx_int8=False, max_seq_length=64, cpu_threads=1)
    teacher = tiny("bert")
    source = layout.width_dir(layout.ofa_dir(out), 0.8333)
    os.makedirs(source)
    save_weights(supernet_of(teacher).model.state_dict(), os.path.join(source, SUPERNET_WEIGHTS))
    teacher.config.save_pretrained(source)
    write_manifest(source, "ofa", cfg.to_dict(), TINY_LABELS, SHA, {"dev_f1": 0.0})
    os.makedirs(layout.stage_dir(out, "teacher"))
    write_manifest(layout.stage_dir(out, "teacher"), "teacher", cfg.to_dict(), TINY_LABELS, SHA)
    return cfg, TinyData(vocab_file), source


def test_a_width_with_more_decimals_is_exported_from_and_to_the_rounded_directory(supernet_run):
    from ner_compress.commands.stages import run_export
    from ner_compress.core.artifacts import read_manifest

    cfg, data, _ = supernet_run
    run_export(cfg, layout.ModelRef("teacher", 0.83333), data)
    out = cfg.output_dir
    assert os.listdir(os.path.join(out, "export")) == ["width_0.8333"]
    assert layout.ModelRef("teacher", 0.8333) in layout.exported_models(out)
    manifest = read_manifest(os.path.join(out, "export", "width_0.8333", "static"), "export")
    assert manifest["width_mult"] == 0.8333 and manifest["layer_heads"] == [3, 3, 3]  # 0.8333 of 4 heads


def test_a_per_layer_plan_exports_with_parity_and_fuses_attention_in_every_layer(supernet_run, tmp_path):
    import onnx

    from ner_compress.core.artifacts import read_manifest
    from ner_compress.deploy import export
    from ner_compress.deploy.backends import FUSED_FILE, ONNX_DIR
    from ner_compress.measure import benchmark
    from ner_compress.models.families import load_config
    from ner_compress.models.width_plan import layer_plan

    cfg, data, source = supernet_run
    plan = layer_plan(load_config(source), HEADS, NEURONS)
    out = str(tmp_path / "export")
    diffs = export.export_plan(cfg, data, source, out, plan)
    assert set(diffs) == {"reloaded dynamic model", "static predictor", "onnx runtime"}
    fusion = read_manifest(os.path.join(out, ONNX_DIR), "export")["onnx"]["fusion"]
    assert fusion["file"] == FUSED_FILE and fusion["fused"]["Attention"] == 3 and "attention_not_fused" not in fusion
    fused = onnx.load(os.path.join(out, ONNX_DIR, FUSED_FILE)).graph.node
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in fused if n.op_type == "Attention"]
    assert heads == HEADS  # each layer's own heads, read from its graph
    shape = benchmark.model_shape(out)
    assert (shape["heads"], shape["ffn"], shape["layer_attn_inner"]) == (HEADS, NEURONS, [32, 16, 8])
    n, t = 2, 5
    per_layer = sum(2 * n * t * 32 * (4 * a + 2 * f) + 4 * n * t * t * a for a, f in zip([32, 16, 8], NEURONS))
    assert benchmark.forward_flops(shape, [{"input_ids": np.zeros((n, t))}]) == per_layer + 2 * n * t * 32 * 7
