"""Report rendering from measured rows: which model is named the smallest that keeps 95% of F1."""
from ner_compress.report import smallest_within

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
