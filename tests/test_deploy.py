"""The deploy install: ONNX Runtime predicts and serves an export, fp32 (fused) or int8, without loading any
module of the training stack, from an export directory copied anywhere. A serving test
(tests/serving_tests.txt): it runs in the full install and in the deploy venv of requirements-serve.txt."""
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from conftest import ROOT, run_tool

from ner_compress.core import compat
from ner_compress.core.artifacts import MANIFEST
from ner_compress.core.errors import UserError
from ner_compress.deploy import backends
from ner_compress.measure.server_process import ServerProcess

TEXTS = ["中国人民银行在北京召开会议，李明出席了会议。", "上海浦东新区人民政府今天发布通知。",
         "新华社记者王小明报道：联合国秘书长访问中国。" * 6]  # the last: several windows
# Run first in a fresh interpreter: at exit, one stderr line listing every loaded module of the training
# stack (paddle, paddlenlp, paddleslim and paddle2onnx all start with "paddle")
REPORT_TRAINING_MODULES = ("import atexit, runpy, sys\n"
                           "atexit.register(lambda: print('training stack modules:', sorted(m for m in sys.modules "
                           "if m.startswith('paddle')), file=sys.stderr))\n")
NONE_LOADED = "training stack modules: []"


def text_flags(texts):
    return [arg for text in texts for arg in ("--text", text)]


def predict(model_dir, *flags):
    """tools/predict.py's JSON records (argmax decoding: the tiny model's real, wrong entities)."""
    result = run_tool("predict.py", "--model_dir", model_dir, "--decoding", "argmax", *flags, *text_flags(TEXTS))
    return [json.loads(line) for line in result.stdout.splitlines()]


def copy_export(static_dir, destination):
    """What the ONNX path of ``export/<model>/`` needs, static/ and onnx/ (not dynamic/), copied under
    ``destination``; the copy's static dir."""
    export_dir, copied = os.path.dirname(static_dir), destination / "deployed" / "model"
    for sub in ("static", backends.ONNX_DIR):
        shutil.copytree(os.path.join(export_dir, sub), copied / sub)
    return copied / "static"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_predict_tool_in_a_fresh_interpreter_loads_no_training_module(served_export, precision):
    code = REPORT_TRAINING_MODULES + f"runpy.run_path({os.path.join(ROOT, 'tools', 'predict.py')!r}, " \
                                     "run_name='__main__')\n"
    result = subprocess.run([sys.executable, "-c", code, "--model_dir", str(served_export), "--precision",
                             precision, "--decoding", "argmax", *text_flags(TEXTS)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == TEXTS
    assert NONE_LOADED in result.stderr.splitlines(), result.stderr[-3000:]


def test_a_copied_export_served_by_a_fresh_interpreter_answers_as_the_original_and_loads_no_training_module(
        served_export, tmp_path):
    copied = copy_export(served_export, tmp_path)
    code = REPORT_TRAINING_MODULES + f"runpy.run_path({os.path.join(ROOT, 'tools', 'serve.py')!r}, " \
                                     "run_name='__main__')\n"
    server = ServerProcess(copied, "--decoding", "argmax", "--warmup_batches", 1, log_path=tmp_path / "server.log",
                           launcher=("-c", code))
    with server:
        answer = httpx.post(server.url + "/predict", json={"texts": TEXTS}, timeout=60)
        health = httpx.get(server.url + "/health", timeout=10).json()
    expected = predict(served_export)
    assert answer.status_code == 200 and answer.json() == {"results": expected}
    assert sum(len(r["entities"]) for r in expected) > 3
    assert health["model_dir"] == str(copied) and health["backend"] == "onnxruntime"
    assert server.process.returncode == 0
    log = server.log_tail(1_000_000)
    assert NONE_LOADED in log.splitlines(), log[-3000:]
    assert "ccache" not in log  # paddle.utils.cpp_extension's start-up warning


def test_what_the_onnx_path_reads_never_names_the_original_export(served_export, tmp_path):
    """The copy predicts alike, and no file of its static/ or onnx/ points back at where it was exported
    (an absolute path there, e.g. ONNX external data, would work here and fail on another machine)."""
    copied = copy_export(served_export, tmp_path)
    assert predict(copied) == predict(served_export)
    assert predict(copied, "--precision", "int8") == predict(served_export, "--precision", "int8")
    original = os.path.dirname(os.path.abspath(served_export)).encode()
    for sub in ("static", backends.ONNX_DIR):
        folder = copied.parent / sub
        for name in sorted(set(os.listdir(folder)) - {MANIFEST}):  # manifests record the run, not read here
            assert original not in (folder / name).read_bytes(), f"{sub}/{name} names {original.decode()}"


def test_backend_paddle_without_paddle_is_refused_in_one_line_naming_the_full_install(served_export, monkeypatch):
    monkeypatch.setattr(compat, "PADDLE_VERSION", None)  # as in the deploy install
    for device in ("cpu", "gpu"):  # on GPU, paddle is the default backend
        with pytest.raises(UserError) as refused:
            backends.load_tagger(str(served_export), None if device == "gpu" else "paddle", device=device)
        message = str(refused.value)
        assert message.startswith("--backend paddle: paddlepaddle is not installed") and "\n" not in message
        assert "pip install -r requirements.txt" in message


@pytest.mark.skipif(compat.PADDLE_VERSION is not None, reason="the deploy install only: here paddle is installed")
def test_deploy_install_refuses_backend_paddle_in_the_tools(served_export):
    for tool in ("predict.py", "serve.py"):
        flags = ["--text", "李明"] if tool == "predict.py" else []
        result = run_tool(tool, "--model_dir", served_export, "--backend", "paddle", *flags, check=False, timeout=120)
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: --backend paddle: paddlepaddle is not installed") and "requirements.txt" in line
