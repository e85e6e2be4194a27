"""Report rendering from measured rows: which model is named the smallest that keeps 95% of F1."""
from ner_compress.measure.report import (annotate, best_within, deployment_targets, int8_lines, markdown,
                                        smallest_within, targets)

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
    assert "vocabulary pruning" not in markdown(results)  # the teacher was not pruned
    results["vocab_pruning"] = {"rows": {"before": 250_002, "kept": 4_700, "dropped": 245_302},
                                "parameters": {"before": 117_500_000, "after": 23_400_000},
                                "bytes_on_disk": {"before": 470_000_000, "after": 93_600_000}, "source_dir": "e5"}
    assert ("Teacher vocabulary pruning: kept 4,700 of 250,002 vocabulary rows (245,302 dropped); parameters "
            "117,500,000 -> 23,400,000; bytes on disk 470,000,000 -> 93,600,000") in markdown(results)


def test_each_target_is_met_or_missed_by_its_own_figure():
    teacher = {**row("teacher", 1000, 0.80, 100, 3.0, kind="fp32"), "dynamic_sentences_per_s": 20}
    half = {**row("width 0.5", 500, 0.795, 300, 1.6, kind="fp32"), "sentences_differing_from_paddle": 0}
    int8 = {**row("width 0.5", 500, 0.78, 350, 1.0, kind="int8"), "sentences_differing_from_paddle": 9}
    ort_int8 = {**row("width 0.5", 500, 0.78, 350, 1.0, kind="onnxruntime-int8"), "sentences_differing_from_paddle": 4}
    met = {t["target"]: t["met"] for t in targets([teacher, half, int8, ort_int8], backend="paddle")}
    assert met == {
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


def test_best_within_97_percent_is_the_fastest_row_above_the_bar_across_width_depth_and_precision():
    rows = [row("teacher", 1000, 0.80, 100, 4.0), row("teacher", 1000, 0.79, 110, 4.2, kind="onnxruntime-unfused"),
            row("width 0.5", 500, 0.785, 300, 2.0), row("width 0.5", 500, 0.70, 900, 1.0, kind="onnxruntime-int8"),
            row("student width 0.5", 300, 0.777, 520, 0.9, kind="onnxruntime-int8"),  # 97.1%: kept, fastest
            row("student", 600, 0.80, 2000, 0.1, kind="int8")]  # Paddle: another backend, not compared
    (found,) = best_within(rows)
    assert found["measured"] == ("student width 0.5 onnxruntime-int8: F1 97.12%, batch-32 5.20x (520 sent/s), "
                                 "batch-1 p50 0.90 ms") and found["met"]
    rows[4]["f1"] = 0.775  # 96.9%: width 0.5 FP32 is then the best, 3x
    (found,) = best_within(rows)
    assert found["measured"].startswith("width 0.5 onnxruntime-fp32: F1 98.12%, batch-32 3.00x") and not found["met"]


def test_int8_rows_show_their_f1_loss_and_speed_up_against_the_right_fp32():
    rows = annotate([{**row("teacher", 1000, 0.80, 100, 4.0), "layers": 2},
                     row("teacher", 1000, 0.78, 160, 2.0, kind="onnxruntime-int8"),
                     row("width 0.5", 500, 0.76, 200, 2.5), row("width 0.5", 500, 0.755, 320, 1.6,
                                                                 kind="onnxruntime-int8")])
    assert [round(r["int8_f1_drop_points"], 6) for r in rows if "int8" in r["precision_kind"]] == [2.0, 0.5]
    assert [r["speedup_b32"] for r in rows] == [1.0, 1.6, 2.0, 3.2]  # all against the FP32 teacher
    assert rows[3]["f1_share_of_teacher"] == 0.755 / 0.80
    met = {t["target"].split(":")[0]: (t["measured"], t["met"]) for t in deployment_targets(rows)}
    assert met["teacher onnxruntime INT8"] == ("1.60x / 2.00x, 2.00 points", False)  # fast enough, too lossy
    assert met["width 0.5 onnxruntime INT8"] == ("1.60x / 1.56x, 0.50 points", True)


def test_int8_table_names_each_models_configuration_beside_its_fp32():
    rows = [row("teacher", 1000, 0.80, 100, 4.0),
            {**row("teacher", 1000, 0.795, 180, 2.5, kind="onnxruntime-int8"),
             "int8_configuration": "dynamic, 4 nodes kept in FP32 (layer 5)"},
            row("width 0.5", 500, 0.76, 200, 2.5),  # no INT8 copy kept: no line
            {**row("student", 300, 0.70, 300, 1.0, kind="onnxruntime-int8"), "int8_configuration": "static"}]
    lines = int8_lines(rows)
    table = [line for line in lines if line.startswith("| teacher") or line.startswith("| width")
             or line.startswith("| student")]
    assert table == ["| teacher | dynamic, 4 nodes kept in FP32 (layer 5) | 0.8000 | 0.7950 | 0.50 | 100 | 180 | "
                     "1.80x | 4.00 | 2.50 | 1.60x |"]  # the student has no FP32 row to stand beside
    assert int8_lines(rows[:1]) == []
