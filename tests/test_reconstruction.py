"""Layer-wise reconstruction: the least-squares refit, its guards, and the stage that runs it on a tiny run."""
import copy
import json
import os
import re

import numpy as np
import paddle
import pytest

from conftest import TINY_LABELS, copy_stages, run_tool
from ner_compress.compress import reconstruction_stage
from ner_compress.compress.reconstruction import (PROJECTIONS, calibration_set, reconstruct, ridge_solution,
                                                  ridge_solutions)
from ner_compress.core import layout
from ner_compress.core.config import Config
from ner_compress.data.corpus import Window
from ner_compress.models.encoder_changes import encoder_layers
from ner_compress.models.families import FAMILIES
from ner_compress.models.modeling import numpy_logits, sub_model_state

PAD = 0


def bert(layers=2, seed=3):
    from paddlenlp.transformers import BertConfig, BertForTokenClassification

    paddle.seed(seed)
    model = BertForTokenClassification(BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        num_labels=len(TINY_LABELS), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2, pad_token_id=PAD))
    model.eval()
    return model


def windows(count=48, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(count):
        n = rng.randint(4, 20)
        ids = np.array([1, *rng.randint(5, 60, size=n), 2], dtype="int64")
        out.append(Window(i, 0, ids, np.array([-100, *rng.randint(0, 7, size=n), -100], dtype="int64")))
    return out


def calibration(count=48, seed=0):
    return calibration_set(windows(count, seed), count, 8, PAD, seed)


def logits_gap(model, teacher, calib):
    """Largest |logit difference| to the teacher over the held-out calibration batches."""
    return max(float(np.abs(numpy_logits(model, b["input_ids"], b["token_type_ids"]) -
                            numpy_logits(teacher, b["input_ids"], b["token_type_ids"])).max())
               for b, held in zip(calib.batches, calib.held_out) if held)


def half_width_cut(teacher):
    config = copy.deepcopy(teacher.config)
    config.width_mult = 0.5
    model = FAMILIES["bert"][1](config)
    model.set_state_dict(sub_model_state(teacher.state_dict(), model))
    model.eval()
    return model


def test_ridge_solution_recovers_an_affine_map():
    rng = np.random.RandomState(0)
    x, w, b = rng.randn(500, 12), rng.randn(12, 5), rng.randn(5)
    fit_w, fit_b = ridge_solution(x, x @ w + b, 1e-12)
    assert np.allclose(fit_w, w, atol=1e-6) and np.allclose(fit_b, b, atol=1e-6)


def test_ridge_solutions_share_one_gram_matrix_and_match_one_solve_each():
    rng = np.random.RandomState(2)
    x, y = rng.randn(200, 10), rng.randn(200, 3)
    for alpha, (w, b) in zip((1e-4, 1e-1), ridge_solutions(x, y, (1e-4, 1e-1))):
        one_w, one_b = ridge_solution(x, y, alpha)
        assert np.allclose(w, one_w) and np.allclose(b, one_b)
    assert not np.allclose(*[w for w, _ in ridge_solutions(x, y, (1e-4, 1e-1))])


def test_refits_sharing_a_targets_cache_run_the_teacher_once_and_refit_alike():
    teacher = bert()
    calls = []
    teacher.register_forward_post_hook(lambda layer, inputs, output: calls.append(1))
    calib, cache = calibration(), {}
    first, again = half_width_cut(teacher), half_width_cut(teacher)
    records = reconstruct(first, teacher, calib, [0, 1], targets_cache=cache)
    teacher_runs = len(calls)
    assert teacher_runs == len(calib.batches)
    assert reconstruct(again, teacher, calib, [0, 1], targets_cache=cache) == records
    assert len(calls) == teacher_runs  # the second refit read the teacher's rows from the cache
    assert all(np.array_equal(v.numpy(), again.state_dict()[k].numpy()) for k, v in first.state_dict().items())


def test_calibration_holds_out_a_quarter_and_sorts_by_length():
    calib = calibration(40)
    assert calib.sentences == 40
    rows = [(len(b["input_ids"]), held) for b, held in zip(calib.batches, calib.held_out)]
    assert sum(n for n, held in rows if held) == 10 and sum(n for n, held in rows if not held) == 30
    lengths = [b["input_ids"].shape[1] for b, held in zip(calib.batches, calib.held_out) if not held]
    assert lengths == sorted(lengths)


@pytest.mark.parametrize("target", ["projection", "residual"])
def test_refit_of_perturbed_projections_gives_back_the_teachers_function(target):
    teacher, model = bert(), bert()
    model.set_state_dict(teacher.state_dict())
    rng = np.random.RandomState(1)
    for layer in encoder_layers(model):
        for proj in (layer.self_attn.out_proj, layer.linear2):
            proj.weight.set_value(proj.weight.numpy() + 0.3 * rng.randn(*proj.weight.shape).astype("float32"))
    calib = calibration()
    assert logits_gap(model, teacher, calib) > 0.05
    records = reconstruct(model, teacher, calib, [0, 1], target)
    assert all(r[p]["applied"] and r[p]["held_out_error_after"] < 1e-3 for r in records for p in PROJECTIONS)
    assert logits_gap(model, teacher, calib) < 1e-3


def test_refit_of_an_exact_copy_changes_no_weight():
    teacher, model = bert(), bert()
    model.set_state_dict(teacher.state_dict())
    records = reconstruct(model, teacher, calibration(), [0, 1])
    assert not any(r[p]["applied"] for r in records for p in PROJECTIONS)
    assert all(np.array_equal(v.numpy(), teacher.state_dict()[k].numpy()) for k, v in model.state_dict().items())


def test_refit_of_a_half_width_cut_lowers_calibration_error_and_never_raises_held_out_error():
    teacher = bert()
    model = half_width_cut(teacher)
    calib = calibration()
    before = logits_gap(model, teacher, calib)
    records = reconstruct(model, teacher, calib, [0, 1])
    refits = [r[p] for r in records for p in PROJECTIONS]
    assert any(f["applied"] for f in refits)
    for f in refits:
        assert f["fit_error_after"] <= f["fit_error_before"] + 1e-9
        assert f["held_out_error_after"] <= f["held_out_error_before"] + 1e-9
    assert logits_gap(model, teacher, calib) < before


def test_a_shallow_student_is_refit_against_the_teacher_layers_it_maps_to():
    from ner_compress.compress.matches import layer_map

    teacher, student = bert(layers=4), bert(layers=2, seed=9)
    mapped = layer_map(2, 4)
    records = reconstruct(student, teacher, calibration(), mapped)
    assert [r["teacher_layer"] for r in records] == mapped == [1, 3]
    assert all(r["ffn_output"]["fit_error_after"] < r["ffn_output"]["fit_error_before"] for r in records)


class TrainOnly:
    """Data whose dev split cannot be read: calibration must come from training windows."""
    class splits:  # noqa: N801
        train = ["a sentence"]

    class encoder:  # noqa: N801
        pad_id = PAD

    def windows(self, split):
        assert split == "train", f"calibration read the {split} split"
        return windows(20)


def test_calibration_reads_training_windows_only():
    calib = reconstruction_stage.calibration(Config(calibration_sentences=12), TrainOnly())
    assert calib.sentences == 12


def test_no_training_split_is_refused_in_one_line():
    data = TrainOnly()
    data.splits = type("Splits", (), {"train": []})
    with pytest.raises(Exception, match="training split is empty") as err:
        reconstruction_stage.calibration(Config(), data)
    assert "\n" not in str(err.value)


def read_manifest(directory):
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_every_width_is_scored_at_step_zero(tiny_run):
    summary = json.load(open(os.path.join(layout.ofa_dir(tiny_run), "summary.json")))
    full = summary["best"]["1.0"]
    # width 1.0 starts as the teacher: unless training beat it, the kept weights are step 0's
    teacher_f1 = read_manifest(layout.stage_dir(tiny_run, "teacher"))["metrics"]["dev_f1"]
    assert full["dev_f1"] >= teacher_f1 - 1e-9
    assert full["step"] == 0 or full["dev_f1"] > teacher_f1


def test_reconstruction_records_calibration_and_errors_and_runs_once(tiny_run, tmp_path):
    """On a copy of the shared run's teacher and supernet (its widths not yet reconstructed)."""
    out = copy_stages(tiny_run, tmp_path, supernet=True)
    result = run_tool("reconstruct.py", "--output_dir", out, "--width_mult", 0.5, "--calibration_sentences", 64)
    directory = layout.width_dir(layout.ofa_dir(out), 0.5)
    record = read_manifest(directory)["reconstruction"]
    assert record["calibration"]["split"] == "train" and record["calibration"]["sentences"] == 64
    assert len(record["layers"]) == 2
    for layer in record["layers"]:
        for proj in PROJECTIONS:
            assert layer[proj]["held_out_error_after"] <= layer[proj]["held_out_error_before"] + 1e-9
    assert record["kept"] == (record["dev_f1_after"] > record["dev_f1_before"])
    assert "reconstruction" in result.stderr
    again = run_tool("reconstruct.py", "--output_dir", out, "--width_mult", 0.5)
    assert "already reconstructed" in again.stderr
    # export reads what reconstruction left: the manifests chain
    run_tool("export.py", "--output_dir", out, "--width_mult", 0.5)
    export = read_manifest(os.path.join(layout.export_dir(out, layout.ModelRef("teacher", 0.5)), "static"))
    assert export["inputs"]["ofa"]["reconstruction"] == record


@pytest.mark.parametrize("args, message", [
    (["--width_mult", 0.75], "--width_mult 0.75: not trained"),
    (["--width_mult", 0.5, "--calibration_sentences", 0], "--calibration_sentences 0"),
    (["--from", "student"], "student_ofa: no trained width here"),
    (["--student"], "no finished student artifact"),
])
def test_bad_reconstruction_input_is_one_line(tiny_run, args, message):
    result = run_tool("reconstruct.py", "--output_dir", tiny_run, *args, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert message in last, result.stderr[-1500:]


def test_the_student_keeps_its_best_step_its_refit_start_included(tiny_run, tmp_path):
    copy_stages(tiny_run, tmp_path)
    # a learning rate that wrecks every weight in its first step
    result = run_tool("distill.py", "--output_dir", tmp_path, "--student_num_layers", 1, "--student_max_steps", 4,
                      "--student_eval_steps", 2, "--student_learning_rate", 1.0, "--calibration_sentences", 32,
                      "--verbose")  # each dev score
    manifest = read_manifest(layout.stage_dir(tmp_path, "student"))
    scored = {int(step): float(f1) for step, f1 in re.findall(r"student step (\d+) dev P \S+ R \S+ F1 (\S+)",
                                                               result.stderr)}
    assert sorted(scored) == [0, 2, 4], result.stderr[-2000:]  # the start is scored like every later step
    best = max(scored.values())
    assert manifest["metrics"]["step"] == min(step for step, f1 in scored.items() if f1 == best)
    assert manifest["metrics"]["dev_f1"] == pytest.approx(best, abs=1e-4)
    start = manifest["start_reconstruction"]
    assert start["calibration"]["sentences"] == 32 and [r["teacher_layer"] for r in start["layers"]] == [1]
    assert "student: start refit against teacher layers [1]" in result.stderr
