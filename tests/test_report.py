"""Report rendering from measured rows: which model is named the smallest that keeps 95% of F1."""
from ner_compress.report import markdown, smallest_within, targets

KIND = "onnxruntime-fp32"


def row(model, params, f1, sent_s, p50, kind=KIND):
    return {"model": model, "precision_kind": kind, "parameters": params, "f1": f1, "sentences_per_s": sent_s,
            "latency_ms_p50": p50}


def test_smallest_model_within_95_percent_skips_smaller_models_below_the_bar():
    rows = [row("teacher", 1000, 0.80, 100, 2.0), row("width 0.5", 800, 0.78, 150, 1.5),
            row("student", 600, 0.77, 200, 1.0), row("student width 0.5", 400, 0.70, 300, 0.8),
            row("student", 100, 0.80, 900, 0.1, kind="int8")]  # another backend: not compared
    (found,) = smallest_within(rows)
    assert found["met"] and found["measured"].startswith("student: 600 parameters (1.67x fewer), F1 96.25%")
    assert "batch-32 2.00x, batch-1 p50 2.00x" in found["measured"]


def test_no_model_within_95_percent_is_a_miss_and_no_teacher_no_check():
    rows = [row("teacher", 1000, 0.80, 100, 2.0), row("width 0.5", 800, 0.70, 150, 1.5)]
    assert smallest_within(rows) == [{"target": "smallest model keeping >= 95% of teacher F1 (onnxruntime-fp32)",
                                      "measured": "none", "met": False}]
    assert smallest_within(rows[1:]) == []


def test_f1_share_is_against_the_teacher_of_the_only_backend_measured():
    rows = [{**row(name, 1000, f1, 100, 1.0), "disk_bytes": 4e6, "precision": f1, "recall": f1, "chars_per_s": 1e4,
             "test_seconds": 1.0} for name, f1 in (("teacher", 0.80), ("student", 0.78))]
    results = {"command": "python tools/benchmark.py --backend onnxruntime", "threads": 2, "matmul_gflops": 1.0,
               "machine": {"cpu": "cpu", "cores": 2, "versions": {}}, "test_sentences": 2, "latency_sentences": 2,
               "speed_sentences": 2, "batch_size": 32, "repeats": 1, "rows": rows, "targets": []}
    table = [line for line in markdown(results).splitlines() if line.startswith("| student |")]
    assert table and " | 97.50% | " in table[0]


def test_each_target_is_met_or_missed_by_its_own_figure():
    teacher = {**row("teacher", 1000, 0.80, 100, 3.0, kind="fp32"), "dynamic_sentences_per_s": 20}
    half = {**row("width 0.5", 500, 0.795, 300, 1.6, kind="fp32"), "sentences_differing_from_paddle": 0}
    int8 = {**row("width 0.5", 500, 0.78, 350, 1.0, kind="int8"), "sentences_differing_from_paddle": 9}
    met = {t["target"]: t["met"] for t in targets([teacher, half, int8], backend="paddle")}
    assert met == {
        "width 0.5 paddle: batch-1 p50 <= 1.5 ms on real sentences": False,  # 1.6 ms
        "width 0.5 paddle: batch-1 p50 >= 1.7x lower than the teacher's": True,  # 1.88x
        "width 0.5 paddle: batch-32 throughput >= 1.8x the teacher's": True,  # 3x
        "every FP32 backend: tags equal Paddle Inference's on the whole test set": True,  # INT8 is not counted
        "width 0.5 FP32: >= 2.5x teacher static throughput at batch 32": True,
        "width 0.5 FP32: >= 99% of teacher F1": True,  # 99.4%
        "width 0.5 INT8: >= 4x FP32 teacher throughput": False,  # 3.5x
        "width 0.5 INT8: F1 within 1 point of FP32 width 0.5": False,  # 1.5 points
        "static predictor: >= 3x dynamic throughput at batch 32 (teacher)": True,  # 5x
    }
    half["sentences_differing_from_paddle"] = 1
    met = {t["target"]: t["met"] for t in targets([teacher, half, int8], backend="paddle")}
    assert not met["every FP32 backend: tags equal Paddle Inference's on the whole test set"]
