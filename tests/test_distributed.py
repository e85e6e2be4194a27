"""Both training stages under ``paddle.distributed.launch``: 2 CPU processes (gloo), tiny config."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY, checkpoints_dir, export_vs_supernet_diff, launch, run_tool
from safetensors.numpy import load_file

from ner_compress.core import layout

COMMON = ["--config", TINY, "--save_steps", "2", "--logging_steps", "1", "--save_total_limit", "10"]
# no dropout: 1 process x batch 16 and 2 processes x batch 8 would draw different masks
TEACHER = [*COMMON, "--eval_steps", "2", "--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0"]
pytestmark = pytest.mark.slow  # every test trains through the tools


def digests(logs, stage):
    found = {}
    for text in logs.values():
        for rank, digest in re.findall(rf"{stage} rank (\d) final parameters sha256 (\w+)", text):
            found[int(rank)] = digest
    return found


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    teacher_logs = launch(2, "train_teacher.py", out, *TEACHER, "--per_device_train_batch_size", 8,
                          "--max_steps", 4)
    ofa_logs = launch(2, "ofa_compress.py", out, *COMMON, "--per_device_train_batch_size", 8, "--ofa_max_steps", 4,
                      "--ofa_eval_steps", 2, "--width_mult_list", 1.0, 0.5)
    return out, teacher_logs, ofa_logs


def test_ranks_end_with_identical_parameters(two_process_run):
    _, teacher_logs, ofa_logs = two_process_run
    for stage, logs in (("teacher", teacher_logs), ("ofa", ofa_logs)):
        found = digests(logs, stage)
        assert sorted(found) == [0, 1], f"{stage}: both ranks must report"
        assert found[0] == found[1], f"{stage}: ranks diverged"


def test_hidden_state_distillation_loss_is_kept_every_step(two_process_run):
    out, _, _ = two_process_run
    history = json.load(open(os.path.join(layout.ofa_dir(str(out)), "summary.json")))["loss_history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for entry in history:  # width 1.0 is the teacher itself and is not trained (--ofa_train_full_width)
        hidden = {k: v for k, v in entry.items() if k.endswith("_hidden")}
        assert list(hidden) == ["w0.5_hidden"] and hidden["w0.5_hidden"] > 0, entry


def test_one_copy_of_each_artifact_and_the_export_predicts_as_the_supernet(two_process_run):
    out, _, _ = two_process_run
    names = sorted(os.listdir(out))
    assert [n for n in names if not n.startswith("log-")] == ["checkpoints", "ofa", "teacher"]
    assert sorted(os.listdir(out / "ofa")) == ["summary.json", "width_0.5", "width_1.0"]
    run_tool("export.py", "--output_dir", out, "--width_mult", 0.5, timeout=600)
    windows, diff = export_vs_supernet_diff(str(out), 0.5)
    assert windows >= 200 and diff < 1e-4


def test_two_processes_match_one_process_with_the_global_batch(two_process_run, tmp_path):
    out, _, _ = two_process_run
    run_tool("train_teacher.py", "--output_dir", tmp_path, *TEACHER, "--per_device_train_batch_size", 16,
             "--max_steps", 4, timeout=600)
    for step in (2, 4):
        name = f"step-{step:08d}"
        one = load_file(str(checkpoints_dir(tmp_path) / name / "model.safetensors"))
        two = load_file(str(checkpoints_dir(out) / name / "model.safetensors"))
        assert max(float(np.abs(one[k] - two[k]).max()) for k in one) < 1e-4
    one_state, two_state = (json.load(open(checkpoints_dir(d) / "step-00000004" / "trainer_state.json"))
                            for d in (tmp_path, out))
    assert [h["step"] for h in one_state["history"]] == [h["step"] for h in two_state["history"]] == [1, 2, 3, 4]
    for a, b in zip(one_state["history"], two_state["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4


RANKS_LEAVE_TOGETHER = '''
import os, sys, threading, time
sys.path.insert(0, {root!r})
from ner_compress.core import parallel
from ner_compress.core.errors import run_cli

out = sys.argv[1]
def main():
    parallel.init()
    if parallel.rank() == 0:
        time.sleep(2)
        open(os.path.join(out, "written"), "w").close()
        time.sleep(1)
        return
    def watch():  # rank 1 is done at once; it sees rank 0's file only if it is still running
        while not os.path.exists(os.path.join(out, "written")):
            time.sleep(0.05)
        open(os.path.join(out, "seen by rank 1"), "w").close()
    threading.Thread(target=watch, daemon=True).start()
run_cli(main)
'''


def test_a_finished_rank_waits_for_the_others_and_the_launch_exits_0(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_LEAVE_TOGETHER.format(root=str(ROOT)))
    result = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                             "--log_dir", str(tmp_path / "log"), str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "seen by rank 1").exists()
