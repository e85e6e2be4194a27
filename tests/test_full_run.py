"""run_pipeline.py with the student, and the stage pool that runs its two branches side by side."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from conftest import NO_DROPOUT, ROOT, STUDENT_MATCHES, TINY, exported_dir, run_tool, trained_dir
from ner_compress.commands import stage_pool
from ner_compress.core.checkpoint import stop_on_signals
from ner_compress.core.errors import StopRequested
from ner_compress.core.config import Config
from ner_compress.core.errors import UserError, run_cli

STUDENT = ["--run_student", "--student_num_layers", 1, "--student_hidden_size", 32, "--student_num_attention_heads",
           2, "--student_intermediate_size", 64, "--intermediate_matches", STUDENT_MATCHES, "--student_max_steps", 6,
           "--student_eval_steps", 3, *NO_DROPOUT]
TWO_CORES = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="side by side needs two cores")


# Branches must be importable by name: the pool starts them in fresh (spawn) processes.
def record(cfg, _data):
    """Write which process ran this branch, with how many threads, when."""
    with open(os.path.join(cfg.output_dir, f"ran-{os.getpid()}-{time.monotonic_ns()}.json"), "w") as fh:
        json.dump({"pid": os.getpid(), "cpu_threads": cfg.cpu_threads}, fh)


def train_until_stopped(cfg, _data):
    """Stands for a training stage: runs until SIGINT/SIGTERM, then leaves a 'checkpoint' and stops."""
    with stop_on_signals() as stop:
        open(os.path.join(cfg.output_dir, f"started-{os.getpid()}"), "w").close()
        while not stop["signum"]:
            time.sleep(0.02)
    path = os.path.join(cfg.output_dir, f"checkpoint-{os.getpid()}")
    open(path, "w").close()
    raise StopRequested(stop["signum"], 7, path)


def fail_once_another_runs(cfg, _data):
    deadline = time.time() + 60
    while not any(name.startswith("started-") for name in os.listdir(cfg.output_dir)) and time.time() < deadline:
        time.sleep(0.02)
    raise UserError("--student_num_layers 9: the teacher has only 2 layers")


def ran(directory):
    return [json.load(open(os.path.join(directory, n))) for n in sorted(os.listdir(directory)) if n.startswith("ran-")]


@TWO_CORES
def test_two_branches_run_in_two_processes_with_a_core_each(tmp_path):
    cfg = Config(output_dir=str(tmp_path), cpu_threads=2)
    stage_pool.run_branches(cfg, [("a", record), ("b", record)])
    runs = ran(tmp_path)
    assert len({r["pid"] for r in runs}) == 2 and os.getpid() not in {r["pid"] for r in runs}
    assert [r["cpu_threads"] for r in runs] == [1, 1]


@pytest.mark.parametrize("settings", [{"stage_processes": 1}, {"cpu_threads": 1}, {"device": "gpu"}])
def test_one_at_a_time_in_this_process_when_asked_or_when_cores_are_short(tmp_path, settings):
    cfg = replace(Config(output_dir=str(tmp_path), cpu_threads=2), **settings)
    stage_pool.run_branches(cfg, [("a", record), ("b", record)])
    runs = ran(tmp_path)
    assert [r["pid"] for r in runs] == [os.getpid()] * 2
    assert [r["cpu_threads"] for r in runs] == [cfg.cpu_threads] * 2


@TWO_CORES
def test_a_failing_branch_stops_the_other_with_its_checkpoint_and_names_itself(tmp_path):
    cfg = Config(output_dir=str(tmp_path), cpu_threads=2)
    with pytest.raises(UserError) as err:
        stage_pool.run_branches(cfg, [("teacher widths", train_until_stopped), ("student", fail_once_another_runs)])
    message = str(err.value)
    assert "stage 'student' failed (exit 2" in message and "teacher widths: stopped" in message
    assert "\n" not in message and "--resume" in message
    assert [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")]


def two_training_branches():
    """``python -c`` entry for the signal test: two branches that train until stopped."""
    cfg = Config(output_dir=sys.argv[1], cpu_threads=2)
    stage_pool.run_branches(cfg, [("a", train_until_stopped), ("b", train_until_stopped)])


@TWO_CORES
def test_sigterm_reaches_every_branch_and_exits_143(tmp_path):
    code = ("import sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]; import test_full_run as t; "
            "from ner_compress.core.errors import run_cli; run_cli(t.two_training_branches)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), ROOT, os.path.join(ROOT, "tests")],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len([n for n in os.listdir(tmp_path) if n.startswith("started-")]) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert len([n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")]) == 2
    assert "stopped by SIGTERM with every stage checkpointed (a: stopped, b: stopped)" in stderr


def test_run_cli_reports_a_stop_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: (_ for _ in ()).throw(StopRequested(signal.SIGINT, detail="with every stage checkpointed")))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == ("stopped: stopped by SIGINT with every stage checkpointed; "
                                               "continue with --resume")


@pytest.mark.slow
def test_pipeline_with_the_student_tables_every_model(tmp_path):
    result = run_tool("run_pipeline.py", "--config", TINY, "--output_dir", tmp_path, "--max_steps", 8,
                      "--ofa_max_steps", 4, "--ofa_eval_steps", 2, *STUDENT)
    report = json.load(open(tmp_path / "report" / "pipeline.json"))
    assert [r["model"] for r in report["rows"]] == ["teacher", "width 1.0", "width 0.5", "student", "student width 1.0",
                                                   "student width 0.5"]
    assert all(r["latency_ms_p50"] > 0 for r in report["rows"])
    assert_scores_are_each_exports_own(tmp_path, report["rows"])
    assert json.load(open(tmp_path / "student" / "config.json"))["num_hidden_layers"] == 1
    assert report["rows"][3]["parameters"] < report["rows"][0]["parameters"]
    assert set(report["training_speed"]) == {"teacher", "ofa", "student", "student ofa"}
    threads = {stage: v["cpu_threads"] for stage, v in report["training_speed"].items()}
    cores = os.cpu_count()
    assert threads["teacher"] == cores
    # the two branches ran side by side, each with half the cores (one after another on a 1-core machine)
    assert threads["ofa"] == threads["student"] == threads["student ofa"] == max(1, cores // 2)
    assert ("side by side" in result.stderr) == (cores >= 2)
    assert "student_ofa: width 0.5 best dev F1" in result.stderr  # each step's score: --verbose
    # how each was made: width 1.0 is never trained (the teacher itself), width 0.5 kept some step of its own
    made = {r["model"]: r["made"] for r in report["rows"]}
    assert made["teacher"].startswith("fine-tuned") and made["width 1.0"] == "cut"
    assert made["width 0.5"].startswith("cut") and made["student"].startswith("random init")  # hidden 32, not 64
    assert "width 0.5 reconstruction: dev F1" in result.stdout
    for source in ("teacher", "student"):
        for width in (None, 0.5):
            assert (exported_dir(tmp_path, "onnx", source, width) / "model.onnx").is_file()


def test_a_student_that_cannot_map_fails_before_the_teacher_trains(tmp_path):
    result = run_tool("run_pipeline.py", "--config", TINY, "--output_dir", tmp_path, "--run_student",
                      "--student_num_layers", 3, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --student_num_layers 3: the teacher has only 2 layers; a student is at most as deep")
    assert not trained_dir(tmp_path).exists()


def assert_scores_are_each_exports_own(out, rows):
    """Each row's scores are its own export's, re-measured on the test set through the row's backend."""
    from ner_compress.deploy.backends import load_tagger
    from ner_compress.core import layout
    from ner_compress.core.config import load_yaml
    from ner_compress.data.corpus import load_splits
    from ner_compress.data.entity_scores import entity_scores

    test = load_splits(Config(**load_yaml(TINY))).test
    directories = {ref.name: layout.export_dir(str(out), ref) for ref in layout.exported_models(str(out))}
    for row in rows:
        tagger = load_tagger(os.path.join(directories[row["model"]], "static"), row["backend"], "cpu", None)
        scores = entity_scores([s.tags for s in test], tagger.tag_sentences(test))
        assert {k: row[k] for k in ("predicted", "precision", "recall", "f1")} == pytest.approx(
            {k: scores[k] for k in ("predicted", "precision", "recall", "f1")}, abs=1e-12), row["model"]
    # the rows' models tag differently, so a row that measured another row's model would be caught
    assert len({r["predicted"] for r in rows}) > 1
