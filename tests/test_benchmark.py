"""tools/benchmark.py on tiny artifacts: report structure, accuracy = predict.py's, ONNX = Paddle."""
import json
import os
import shutil

import paddle
import pytest
from conftest import TINY, exported_dir
from conftest import run_tool as run

from ner_compress.core import layout, static_files
# Paddle 3 exports a PIR program, which post-training INT8 quantization cannot read (benchmark.int8_unavailable)
INT8 = {"int8"} if paddle.__version__.startswith("2.") else set()


@pytest.fixture(scope="module")
def bench(tiny_run, tmp_path_factory):
    """The benchmark on a copy of the shared run (teacher, widths 1.0 and 0.5, two of them exported): it
    exports width 1.0 itself and writes the report."""
    out = tmp_path_factory.mktemp("bench")
    shutil.copytree(tiny_run, out, dirs_exist_ok=True)
    assert not layout.is_exported(str(out), layout.ModelRef("teacher", 1.0))  # --export_missing's to make
    run("benchmark.py", "--output_dir", out, "--export_missing", "--repeats", 1, "--speed_sentences", 32,
        "--latency_sentences", 8, "--calibration_sentences", 32)
    return out, json.load(open(os.path.join(layout.report_dir(str(out)), "results.json")))


def test_report_has_every_model_backend_and_figure(bench):
    out, results = bench
    kinds = [(r["model"], r["precision_kind"]) for r in results["rows"]]
    for model in ("teacher", "width 1.0", "width 0.5"):
        assert {(model, kind) for kind in {"fp32", "onnxruntime-fp32"} | INT8} <= set(kinds)
    fp32 = [r for r in results["rows"] if r["precision_kind"] == "fp32"]
    for row in fp32:
        assert_figures_are_of_the_rows_export(out, row)
        assert set(row["per_type"]) <= {"PER", "LOC", "ORG"}
    half, teacher = (next(r for r in fp32 if r["model"] == m) for m in ("width 0.5", "teacher"))
    assert half["parameters"] < teacher["parameters"] and half["disk_bytes"] < teacher["disk_bytes"]
    assert results["matmul_gflops"] > 0 and results["machine"]["cores"] >= 1
    assert {t["target"].split(":")[0] for t in results["targets"]} >= {"width 0.5 FP32", "static predictor"} | (
        {"width 0.5 INT8"} if INT8 else set())
    half_share = next(t for t in results["targets"] if t["target"] == "width 0.5 FP32: >= 99% of teacher F1")
    assert half_share["met"] == (teacher["f1"] > 0 and half["f1"] >= 0.99 * teacher["f1"])  # no share of 0
    report = read_report(out)
    assert "python tools/benchmark.py" in report
    for t in results["targets"]:
        assert f"- {t['target']}: {t['measured']} — **{'met' if t['met'] else 'missed'}**" in report
    with open(os.path.join(layout.report_dir(str(out)), "pareto.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def read_report(out):
    with open(os.path.join(layout.report_dir(str(out)), "report.md"), encoding="utf-8") as fh:
        return fh.read()


def assert_figures_are_of_the_rows_export(out, row):
    """Sizes, shape and FLOP rate re-derived from the row's export; latency percentiles in order."""
    from safetensors import safe_open

    from ner_compress.measure import benchmark
    from ner_compress.deploy.backends import StaticTagger
    from ner_compress.core.config import Config, load_yaml
    from ner_compress.data.corpus import load_splits

    export_dir = next(layout.export_dir(str(out), ref) for ref in layout.exported_models(str(out))
                      if ref.name == row["model"])
    static = os.path.join(export_dir, "static")
    program, params = static_files.static_model_files(static)  # model.json on Paddle 3, .pdmodel on 2.6
    assert row["disk_bytes"] == os.path.getsize(program) + os.path.getsize(params)
    with safe_open(os.path.join(export_dir, "dynamic", "model.safetensors"), "np") as weights:
        q_columns = weights.get_slice("bert.encoder.layers.0.self_attn.q_proj.weight").get_shape()[1]
        neurons = weights.get_slice("bert.encoder.layers.0.linear1.weight").get_shape()[1]
    assert (row["heads"] * 16, row["ffn_neurons"]) == (q_columns, neurons)  # tiny.yaml: 64 hidden / 4 heads
    speed = load_splits(Config(**load_yaml(TINY))).test[:32]
    flops = benchmark.forward_flops(benchmark.model_shape(export_dir), benchmark.fixed_batches(
        StaticTagger(static), speed, 32))
    assert row["gflops_achieved"] == pytest.approx(flops / row["batch_seconds"] / 1e9, rel=1e-9)
    assert row["chars_per_s"] / row["sentences_per_s"] == pytest.approx(sum(len(s.chars) for s in speed) / 32)
    assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"] <= row["latency_ms_p99"]
    assert row["dynamic_sentences_per_s"] > 0


def test_flops_count_the_heads_and_neurons_a_snapped_width_keeps(tmp_path):
    """12 heads at 0.8333 keep 10 heads and 2,560 of 3,072 neurons (not int(12 x 0.8333) = 9, nor 2,559)."""
    import numpy as np
    from paddlenlp.transformers import BertConfig

    from ner_compress.measure import benchmark
    from ner_compress.models.families import PrunedBertForTokenClassification

    config = BertConfig(vocab_size=40, hidden_size=96, num_hidden_layers=1, num_attention_heads=12,
                        intermediate_size=3072, num_labels=7)
    config.width_mult = 0.8333
    model = PrunedBertForTokenClassification(config)
    model.save_pretrained(str(tmp_path / "dynamic"), safe_serialization=True)
    layer = model.bert.encoder.layers[0]
    built = (layer.self_attn.q_proj.weight.shape[1], layer.linear1.weight.shape[1])
    shape = benchmark.model_shape(str(tmp_path))
    assert (shape["heads"], shape["ffn"]) == (10, 2560) and (shape["layer_attn_inner"][0], shape["ffn"]) == built
    n, t = 2, 5
    per_layer = 2 * n * t * 96 * (4 * 10 * 8 + 2 * 2560) + 4 * n * t * t * 10 * 8
    assert benchmark.forward_flops(shape, [{"input_ids": np.zeros((n, t))}]) == per_layer + 2 * n * t * 96 * 7


def test_each_backend_and_precision_present_is_a_row_measured_in_a_process_of_its_own(bench):
    from ner_compress.measure import benchmark
    from ner_compress.deploy.backends import BACKENDS

    out, results = bench
    rows = results["rows"]
    expected = [(ref.name, kind) for ref in layout.exported_models(str(out))
                for _, kind in benchmark.variants(layout.export_dir(str(out), ref), BACKENDS)]
    assert [(r["model"], r["precision_kind"]) for r in rows] == expected
    assert {"onnxruntime-unfused", "onnxruntime-int8"} <= {kind for _, kind in expected}  # the export wrote both
    assert len({r["pid"] for r in rows}) == len(rows) and os.getpid() not in {r["pid"] for r in rows}


def test_int8_rows_carry_their_own_models_int8_f1(bench):
    from ner_compress.deploy.backends import OnnxTagger
    from ner_compress.core.config import Config, load_yaml
    from ner_compress.data.corpus import load_splits
    from ner_compress.data.entity_scores import entity_scores

    out, results = bench
    test = load_splits(Config(**load_yaml(TINY))).test
    int8 = OnnxTagger(str(exported_dir(out, width=0.5)), precision="int8").tag_sentences(test)
    row = next(r for r in results["rows"] if (r["model"], r["precision_kind"]) == ("width 0.5", "onnxruntime-int8"))
    assert row["graph"] == "model.int8.onnx"
    assert row["f1"] == pytest.approx(entity_scores([s.tags for s in test], int8)["f1"], abs=1e-12)
    fp32 = next(r for r in results["rows"] if (r["model"], r["precision_kind"]) == ("width 0.5", "onnxruntime-fp32"))
    assert row["int8_f1_drop_points"] == pytest.approx((fp32["f1"] - row["f1"]) * 100)
    chosen = json.load(open(exported_dir(out, "onnx", width=0.5) / "manifest.json"))["onnx"]["int8"]
    assert row["int8_configuration"] == f"dynamic, {chosen['configuration']}"  # as the export chose it
    report = read_report(out)
    assert f"| width 0.5 | dynamic, {chosen['configuration']} | {fp32['f1']:.4f} | {row['f1']:.4f} |" in report


def test_fusion_counts_in_the_report_are_the_manifests(bench):
    out, results = bench
    report = read_report(out)
    for model, width in (("teacher", None), ("width 0.5", 0.5)):
        manifest = json.load(open(exported_dir(out, "onnx", width=width) / "manifest.json"))
        fused = manifest["onnx"]["fusion"]["fused"]
        counts = "/".join(str(fused[op]) for op in ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization",
                                                   "BiasGelu"))
        line = next(line for line in report.splitlines() if line.startswith(f"| {model} | onnxruntime-fp32 |"))
        assert f" | {counts} | " in line and fused["Attention"] > 0


def test_percentile_is_numpys_linear_interpolation():
    import numpy as np

    from ner_compress.measure.timing import latency_summary, percentile

    values = [7.0, 1.0, 3.0, 2.0, 10.0]
    assert percentile(values, 95) == pytest.approx(9.4)  # sorted 1 2 3 7 10: rank 3.8 -> 7 + 0.8 x 3
    assert percentile(values, 50) == 3.0
    data = np.random.default_rng(0).exponential(size=101)
    assert latency_summary(data) == {f"latency_ms_p{q}": pytest.approx(np.percentile(data, q)) for q in (50, 95, 99)}


def test_onnx_runtime_agrees_with_paddle_inference(bench):
    _, results = bench
    for row in results["rows"]:
        if row["precision_kind"] in ("onnxruntime-fp32", "onnxruntime-unfused"):
            assert row["max_abs_diff_vs_paddle"] < 1e-4
            paddle_row = next(r for r in results["rows"] if r["model"] == row["model"] and r["precision_kind"] == "fp32")
            assert row["f1"] == pytest.approx(paddle_row["f1"], abs=1e-9)


def test_accuracy_equals_predict_tool_on_the_same_sentences(bench, tmp_path):
    import ner_compress  # noqa: F401
    from ner_compress.core.config import Config, load_yaml
    from ner_compress.data.corpus import load_splits
    from ner_compress.data.entity_scores import entity_scores

    out, results = bench
    test = load_splits(Config(**load_yaml(TINY))).test
    texts = tmp_path / "test.txt"
    texts.write_text("\n".join("".join(s.chars) for s in test) + "\n", encoding="utf-8")
    predicted = run("predict.py", "--model_dir", exported_dir(out, width=0.5), "--input_file", texts)
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(records) == len(test)
    assert sum(len(r["entities"]) for r in records) > 10
    pred_tags = []
    for record, sentence in zip(records, test):
        tags = ["O"] * len(sentence.chars)
        for ent in record["entities"]:
            tags[ent["start"]: ent["end"]] = [f"B-{ent['type']}"] + [f"I-{ent['type']}"] * (ent["end"] - ent["start"] - 1)
        pred_tags.append(tags)
    scores = entity_scores([s.tags for s in test], pred_tags)
    row = next(r for r in results["rows"] if r["model"] == "width 0.5" and r["precision_kind"] == "fp32")
    assert row["predicted"] == sum(len(r["entities"]) for r in records) == scores["predicted"]
    for key in ("precision", "recall", "f1"):
        assert row[key] == pytest.approx(scores[key], abs=1e-12)


def test_another_test_file_is_scored_into_its_own_report(bench, tmp_path):
    """--test_file replaces the test split whatever the training source (an out-of-domain check); --report_dir
    keeps the in-domain report as it was."""
    out, _ = bench
    before = read_report(out)
    ood = tmp_path / "ood.txt"
    ood.write_text("张 B-PER\n三 I-PER\n在 O\n京 B-LOC\n\n上 B-LOC\n海 I-LOC\n好 O\n", encoding="utf-8")
    report_dir = os.path.join(str(out), "report", "ood")
    run("benchmark.py", "--output_dir", out, "--test_file", ood, "--report_dir", report_dir, "--models", "teacher",
        "--backend", "onnxruntime", "--repeats", 1, "--speed_sentences", 2, "--latency_sentences", 2)
    results = json.load(open(os.path.join(report_dir, "results.json")))
    assert (results["test_sentences"], results["test_source"]) == (2, str(ood))
    assert {r["model"] for r in results["rows"]} == {"teacher"}
    assert f"Test sentences: 2 ({ood})" in open(os.path.join(report_dir, "report.md"), encoding="utf-8").read()
    assert read_report(out) == before
