"""CPU settings are in force inside each training tool's process (read back from the runtime)."""
import json
import os

import conftest
import pytest
from conftest import trained_dir

from ner_compress.core import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
AMD = runtime.cpu_vendor() == "AuthenticAMD"
pytestmark = pytest.mark.slow  # every test trains through the tools


def run_tool(name, out, *args, env_extra=None):
    """The tool with none of the CPU settings inherited from this process, plus ``env_extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "NER_COMPRESS_MKL_FIX",
                                                              "OMP_NUM_THREADS")}
    env.update(env_extra or {})
    return conftest.run_tool(name, "--output_dir", out, *args, timeout=600, env=env)


@pytest.fixture(scope="module")
def one_thread_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_thread")
    teacher = run_tool("train_teacher.py", out, "--config", TINY, "--max_steps", 4, "--eval_steps", 4,
                       "--cpu_threads", 1)
    ofa = run_tool("ofa_compress.py", out, "--ofa_max_steps", 2, "--ofa_eval_steps", 2, "--cpu_threads", 1)
    return out, teacher.stderr + ofa.stderr


def test_threads_and_mkl_setting_read_back_in_each_training_tool(one_thread_run):
    out, _ = one_thread_run
    for manifest_path in (trained_dir(out) / "manifest.json", trained_dir(out, width=0.5) / "manifest.json"):
        info = json.load(open(manifest_path))["runtime"]
        assert info["cpu_threads"] == 1 and info["openmp_threads"] == 1, manifest_path
        assert info["MKL_DEBUG_CPU_TYPE"] == ("5" if AMD else None)
        assert info["mkl_fix_applied"] is AMD


def test_settings_are_logged_once_per_tool(one_thread_run):
    _, stderr = one_thread_run
    lines = [line for line in stderr.splitlines() if " cpu: " in line]
    assert len(lines) == 2 and all("1 math threads (OpenMP reads back 1)" in line for line in lines)


def test_default_is_every_core_and_the_fix_can_be_turned_off(tmp_path):
    run_tool("train_teacher.py", tmp_path, "--config", TINY, "--max_steps", 2, "--eval_steps", 2,
             env_extra={"NER_COMPRESS_MKL_FIX": "0"})
    info = json.load(open(trained_dir(tmp_path) / "manifest.json"))["runtime"]
    assert info["cpu_threads"] == os.cpu_count() and info["openmp_threads"] == os.cpu_count()
    assert info["MKL_DEBUG_CPU_TYPE"] is None and info["mkl_fix_applied"] is False


def test_a_users_own_mkl_setting_wins(tmp_path):
    run_tool("train_teacher.py", tmp_path, "--config", TINY, "--max_steps", 2, "--eval_steps", 2,
             env_extra={"MKL_DEBUG_CPU_TYPE": "4"})
    info = json.load(open(trained_dir(tmp_path) / "manifest.json"))["runtime"]
    assert info["MKL_DEBUG_CPU_TYPE"] == "4" and info["mkl_fix_applied"] is False
