"""tools/benchmark.py on tiny artifacts: report structure, accuracy = predict.py's, ONNX = Paddle."""
import json
import os

import paddle
import pytest
from conftest import run_tool as run
from conftest import train_near_random_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# Paddle 3 exports a PIR program, which post-training INT8 quantization cannot read (benchmark.int8_unavailable)
INT8 = {"int8"} if paddle.__version__.startswith("2.") else set()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    train_near_random_teacher(out)
    run("ofa_compress.py", "--output_dir", out, "--width_mult_list", 1.0, 0.5, "--ofa_max_steps", 2,
        "--ofa_eval_steps", 1, "--ofa_learning_rate", 1e-7)
    run("benchmark.py", "--output_dir", out, "--export_missing", "--repeats", 1, "--speed_sentences", 32,
        "--latency_sentences", 8, "--calibration_sentences", 32)
    return out, json.load(open(out / "report" / "results.json"))


def test_report_has_every_model_backend_and_figure(bench):
    out, results = bench
    kinds = {(r["model"], r["precision_kind"]) for r in results["rows"]}
    for model in ("teacher", "width 1.0", "width 0.5"):
        assert {(model, kind) for kind in {"fp32", "onnxruntime-fp32"} | INT8} <= kinds
    fp32 = [r for r in results["rows"] if r["precision_kind"] == "fp32"]
    for row in fp32:
        for key in ("precision", "recall", "f1", "parameters", "disk_bytes", "latency_ms_p50", "latency_ms_p95",
                    "sentences_per_s", "chars_per_s", "test_seconds", "dynamic_sentences_per_s", "gflops_achieved"):
            assert row[key] is not None and row[key] >= 0, key
        assert set(row["per_type"]) <= {"PER", "LOC", "ORG"}
    half, teacher = (next(r for r in fp32 if r["model"] == m) for m in ("width 0.5", "teacher"))
    assert half["parameters"] < teacher["parameters"] and half["disk_bytes"] < teacher["disk_bytes"]
    assert results["matmul_gflops"] > 0 and results["machine"]["cores"] >= 1
    targets = {"width 0.5 FP32", "static predictor"} | ({"width 0.5 INT8"} if INT8 else set())
    assert {t["target"].split(":")[0] for t in results["targets"]} >= targets
    assert all(isinstance(t["met"], bool) for t in results["targets"])
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "python tools/benchmark.py" in report and ("met" in report or "missed" in report)
    assert (out / "report" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_onnx_runtime_agrees_with_paddle_inference(bench):
    _, results = bench
    for row in results["rows"]:
        if row["precision_kind"] == "onnxruntime-fp32":
            assert row["max_abs_diff_vs_paddle"] < 1e-4
            paddle_row = next(r for r in results["rows"] if r["model"] == row["model"] and r["precision_kind"] == "fp32")
            assert row["f1"] == pytest.approx(paddle_row["f1"], abs=1e-9)


def test_accuracy_equals_predict_tool_on_the_same_sentences(bench, tmp_path):
    import ner_compress  # noqa: F401
    from ner_compress.config import Config, load_yaml
    from ner_compress.data import load_splits
    from ner_compress.metrics import entity_scores

    out, results = bench
    test = load_splits(Config(**load_yaml(TINY))).test
    texts = tmp_path / "test.txt"
    texts.write_text("\n".join("".join(s.chars) for s in test) + "\n", encoding="utf-8")
    predicted = run("predict.py", "--model_dir", out / "export" / "width_0.5" / "static", "--input_file", texts)
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
