"""Kills, interrupted writes, tampered or mismatched inputs, and hostile text for predict."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from conftest import ROOT, TINY, checkpoints_dir, copy_stages, exported_dir, max_weight_diff, tool_command, \
    trained_dir, wait_for
from conftest import run_tool as run

RUN = ["--config", TINY, "--max_steps", 24, "--save_steps", 4, "--eval_steps", 8, "--save_total_limit", 10]


def final_weights(out, step=24):
    return load_file(str(checkpoints_dir(out) / f"step-{step:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A teacher trained 24 steps with a checkpoint every 4, in one go."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run("train_teacher.py", *RUN, "--output_dir", out)
    return out


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_weights(uninterrupted, tmp_path):
    proc = subprocess.Popen(tool_command("train_teacher.py", *RUN, "--output_dir", tmp_path), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(checkpoints_dir(tmp_path) / "step-00000012" / "trainer_state.json", proc)
    proc.kill()
    proc.wait()
    assert not (checkpoints_dir(tmp_path) / "step-00000024").exists()
    result = run("train_teacher.py", *RUN, "--output_dir", tmp_path, "--resume")
    assert "resumed from" in result.stderr
    assert max_weight_diff(final_weights(uninterrupted), final_weights(tmp_path)) < 1e-6
    best = json.load(open(trained_dir(tmp_path) / "manifest.json"))["metrics"]
    assert best == json.load(open(trained_dir(uninterrupted) / "manifest.json"))["metrics"]


@pytest.mark.slow
def test_sigterm_writes_a_last_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(tool_command("train_teacher.py", *RUN, "--max_steps", 2000, "--save_steps", 1000,
                                         "--output_dir", tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(trained_dir(tmp_path) / "manifest.json", proc)  # training is under way (first eval done)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    steps = sorted(os.listdir(checkpoints_dir(tmp_path)))
    assert steps and all(s.startswith("step-") for s in steps)
    state = json.load(open(checkpoints_dir(tmp_path) / steps[-1] / "trainer_state.json"))
    assert 8 <= state["step"] < 2000


@pytest.mark.slow
def test_checkpoints_are_pruned_to_the_limit(tmp_path):
    run("train_teacher.py", *RUN, "--save_total_limit", 2, "--output_dir", tmp_path)
    # max_steps 24 with save_steps 4: the last two are 20 and 24 (the epoch is longer than 24 steps)
    assert sorted(os.listdir(checkpoints_dir(tmp_path))) == ["step-00000020", "step-00000024"]


@pytest.mark.slow
def test_kill_during_an_artifact_write_keeps_the_previous_one(uninterrupted):
    """A writer SIGKILLed inside atomic_dir, mid-write and between the two renames."""
    teacher = trained_dir(uninterrupted)
    before = json.load(open(teacher / "manifest.json"))
    for stage in ("mid-write", "between-renames"):
        script = f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
import ner_compress.core.artifacts as a
final = {str(teacher)!r}
if {stage!r} == "between-renames":
    os.replace(final, final + ".old-" + str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
with a.atomic_dir(final) as tmp:
    open(os.path.join(tmp, "model.safetensors"), "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
        assert proc.returncode == -signal.SIGKILL
        import ner_compress  # noqa: F401
        from ner_compress.core.artifacts import read_manifest

        assert read_manifest(str(teacher), "teacher") == before  # hashes verified too
        assert not [n for n in os.listdir(uninterrupted) if ".partial-" in n or ".old-" in n]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["a model directory", "optimizer state missing", "truncated weights"])
def test_resume_from_a_damaged_checkpoint_is_refused_in_one_line(uninterrupted, tmp_path, damage):
    checkpoint = tmp_path / "step-00000024"
    shutil.copytree(checkpoints_dir(uninterrupted) / "step-00000024", checkpoint)
    if damage == "a model directory":
        checkpoint = trained_dir(uninterrupted)
        expected = "not a complete checkpoint (optimizer.safetensors, optimizer.json, trainer_state.json missing)"
    elif damage == "optimizer state missing":
        (checkpoint / "optimizer.safetensors").unlink()
        expected = "not a complete checkpoint (optimizer.safetensors missing)"
    else:
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        expected = "unreadable checkpoint"
    out = tmp_path / "out"
    result = run("train_teacher.py", *RUN, "--output_dir", out, "--resume_from", checkpoint, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: --resume_from {checkpoint}: ") and expected in message, message
    assert "Traceback" not in result.stderr
    assert not checkpoints_dir(out).exists() and not trained_dir(out).exists()  # no fresh start instead


@pytest.fixture(scope="module")
def supernet(tiny_run, tmp_path_factory):
    """The shared run's teacher and width supernet, copied: not exported yet, and these tests change them."""
    return copy_stages(tiny_run, tmp_path_factory.mktemp("supernet"), supernet=True)


def test_export_whose_parity_is_off_is_refused_and_leaves_no_directory(supernet, monkeypatch, capsys):
    from ner_compress.deploy import export
    from ner_compress.commands import stages
    from ner_compress.core.errors import run_cli

    class DriftingStatic(export.StaticTagger):
        """A static graph that computes slightly other logits than the model it was saved from."""

        def logits(self, input_ids, token_type_ids):
            return super().logits(input_ids, token_type_ids) + 1e-3

    monkeypatch.setattr(export, "StaticTagger", DriftingStatic)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: stages.export_cli(["--output_dir", str(supernet), "--width_mult", "0.5"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: export parity failed: static predictor differs from supernet at width 0.5 by 1.00e-03 "
        "(tolerance 1e-04); the export is not written")
    export_dir = exported_dir(supernet, width=0.5).parent
    assert not export_dir.exists()
    assert not [n for n in os.listdir(export_dir.parent) if ".partial-" in n or ".old-" in n]


def test_tampered_weights_are_refused(supernet):
    weights = trained_dir(supernet, width=0.5) / "supernet.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-4] + b"\x00\x00\x00\x01")
        result = run("export.py", "--output_dir", supernet, "--width_mult", 0.5, check=False)
        assert result.returncode == 2
        assert "supernet.safetensors" in result.stderr and "sha256" in result.stderr
    finally:
        weights.write_bytes(original)


@pytest.mark.slow
def test_mismatched_labels_and_vocabulary_are_refused(uninterrupted, tmp_path):
    other_labels = tmp_path / "train.txt"
    other_labels.write_text("苹\tB-PRODUCT\n果\tI-PRODUCT\n\n" + "张\tB-PER\n三\tI-PER\n在\tO\n\n" * 30,
                            encoding="utf-8")
    result = run("ofa_compress.py", "--output_dir", uninterrupted, "--train_file", other_labels, "--dev_size", 5,
                 check=False)
    assert result.returncode == 2 and "labels" in result.stderr and "differ" in result.stderr
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "张", "三"]) + "\n", encoding="utf-8")
    result = run("ofa_compress.py", "--output_dir", uninterrupted, "--vocab_file", vocab, check=False)
    assert result.returncode == 2 and "vocabulary" in result.stderr


@pytest.mark.slow
def test_pickled_weights_need_allow_pickle(uninterrupted, tmp_path):
    import ner_compress  # noqa: F401
    from paddlenlp.transformers import BertForTokenClassification

    pickled = tmp_path / "pickled"
    BertForTokenClassification.from_pretrained(str(trained_dir(uninterrupted))).save_pretrained(str(pickled))
    assert (pickled / "model_state.pdparams").exists()
    args = ["--config", TINY, "--max_steps", 1, "--eval_steps", 1, "--model_name_or_path", pickled,
            "--output_dir", tmp_path / "out"]
    refused = run("train_teacher.py", *args, check=False)
    assert refused.returncode == 2 and "--allow_pickle" in refused.stderr
    run("train_teacher.py", *args, "--allow_pickle")


@pytest.fixture(scope="module")
def static_model(tiny_run):
    return exported_dir(tiny_run)


def test_predict_survives_hostile_lines(static_model, tmp_path):
    lines = [
        "张三在北京工作".encode(),
        b"",
        b"\xff\xfe\xfa broken",
        "控制\x00字符\x07\x1b[31m红".encode(),
        ("长" * 1_000_000).encode(),
        "最后一行".encode(),
    ]
    hostile = tmp_path / "hostile.txt"
    hostile.write_bytes(b"\n".join(lines) + b"\n")
    result = run("predict.py", "--model_dir", static_model, "--input_file", hostile, timeout=300)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["text"] == "张三在北京工作" and records[1]["entities"] == []
    assert "UTF-8" in records[2]["error"]
    assert records[3]["text"] == "控制\x00字符\x07\x1b[31m红"
    assert "longer than" in records[4]["error"]
    assert records[5]["text"] == "最后一行"


def test_predict_streams_a_large_file(static_model, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as fh:
        for i in range(3000):
            fh.write(f"第{i}行：李四去上海。\n")
    result = run("predict.py", "--model_dir", static_model, "--input_file", big, "--batch_size", 64, timeout=300)
    lines = result.stdout.splitlines()
    assert len(lines) == 3000 and json.loads(lines[-1])["line"] == 3000
