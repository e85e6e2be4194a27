"""The console: known-harmless third-party warnings and INFO lines are silenced at their source, and our own
step-by-step lines kept for --verbose (or NER_COMPRESS_VERBOSE=1), which asks for everything."""
import logging
import os
import re
import shutil

import pytest
from conftest import TINY, run_tool
from ner_compress.core import console
from test_full_run import STUDENT


def test_a_tool_prints_no_import_time_warnings_unless_verbose():
    quiet = run_tool("export.py", "--help")
    assert "ccache" not in quiet.stderr and "pkg_resources" not in quiet.stderr, quiet.stderr[-1500:]
    loud = run_tool("export.py", "--help", env={**os.environ, "NER_COMPRESS_VERBOSE": "1"})
    assert "ccache" in loud.stderr


def test_library_loggers_are_quieted_at_their_loggers(monkeypatch):
    monkeypatch.delenv("NER_COMPRESS_VERBOSE", raising=False)
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)  # as paddle.distributed leaves it
        console.quiet_libraries()
        assert root.level == logging.WARNING
        assert logging.getLogger("fusion_attention").level == logging.ERROR
        assert not logging.getLogger("fusion_attention").isEnabledFor(logging.WARNING)
        assert logging.getLogger("ner_compress").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(before)


def test_every_help_text_mentions_verbose_for_the_pipeline():
    assert "--verbose" in run_tool("run_pipeline.py", "--help").stdout


def test_a_libraries_stdout_goes_to_its_logger(monkeypatch, caplog, capfd):
    monkeypatch.delenv("NER_COMPRESS_VERBOSE", raising=False)
    caplog.set_level(logging.INFO, logger="a.cpp.library")
    with console.stdout_lines_to("a.cpp.library"):
        os.write(1, b"[Lib] Start parsing...\n2026-01-01 [WARNING]\tcheck this\n")  # below Python's sys.stdout
    assert capfd.readouterr().out == ""
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "a.cpp.library"] == [
        (logging.INFO, "[Lib] Start parsing..."), (logging.WARNING, "2026-01-01 [WARNING]\tcheck this")]


def test_only_paddlenlp_notices_of_a_fresh_classifier_are_dropped():
    def shown(message):
        return console.expected_load_notice(logging.LogRecord("PaddleNLP", logging.WARNING, __file__, 1, message,
                                                              None, None))

    assert not shown("Some weights of the model checkpoint at output/pruned_model were not used when initializing")
    assert not shown("Some weights of BertForTokenClassification were not initialized from the model checkpoint at x "
                     "and are newly initialized: ['classifier.weight', 'classifier.bias']\nYou should probably TRAIN")
    assert shown("Some weights of BertForTokenClassification were not initialized from the model checkpoint at x and "
                 "are newly initialized: ['bert.encoder.layers.0.linear1.weight']")


# what a tiny pipeline with the student may print (6 models, the same stages as the default run): see the per-stage
# budget in core/console.py
TINY_PIPELINE_LINES = 45
THIRD_PARTY = ("[Paddle2ONNX]", "onnx_quantizer", "fusion_base", "Warning", "Some weights of", "eager_utils.cc")


BAR = re.compile(r"^[\w ]+: +\d+%\|")  # tqdm's "teacher:  50%|#####     | 4/8 [...]"


def console_lines(text):
    """The lines a terminal keeps: a progress bar redrawn with carriage returns (read back as newlines here) is
    one line."""
    raw = text.rstrip("\n").split("\n") if text.strip() else []
    kept = []
    for i, line in enumerate(raw):
        if BAR.match(line) and kept and BAR.match(kept[-1]):
            kept[-1] = line
        elif line or i + 1 == len(raw) or not BAR.match(raw[i + 1]):  # "\n\r" before a bar is no blank line
            kept.append(line)
    return kept


@pytest.fixture(scope="module")
def quiet_pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("console")
    env = {k: v for k, v in os.environ.items() if k != "NER_COMPRESS_VERBOSE"}
    result = run_tool("run_pipeline.py", "--config", TINY, "--output_dir", out, "--max_steps", 8, "--ofa_max_steps", 4,
                      "--ofa_eval_steps", 2, *STUDENT, env=env)
    return out, console_lines(result.stdout) + console_lines(result.stderr)


def test_the_pipeline_prints_a_line_per_stage_and_the_table(quiet_pipeline):
    _, lines = quiet_pipeline
    text = "\n".join(lines)
    assert len(lines) <= TINY_PIPELINE_LINES, text
    assert not [line for line in lines if any(marker in line for marker in THIRD_PARTY)], text
    assert not re.search(r"^[IWE]\d{4} ", text, re.M), text  # Paddle's C++ log (glog)
    assert not re.search(r"step \d+/\d+|dev P |final parameters sha256|ONNX INT8 \(", text), text  # ours: --verbose
    assert len([line for line in lines if re.search(r"/export/\S+: dynamic, static, ONNX", line)]) == 6, text
    for stage in ("teacher: best dev F1", "student: best dev F1", "ofa: width 0.5 best", "student_ofa: width 0.5 best"):
        assert stage in text
    assert len([line for line in lines if line.startswith("| ")]) == 7  # the table: header and a row per model


def test_verbose_restores_every_librarys_lines_and_ours(quiet_pipeline, tmp_path):
    out, _ = quiet_pipeline
    shutil.copytree(out, tmp_path / "out")  # the export below rewrites export/teacher
    result = run_tool("export.py", "--teacher", "--output_dir", tmp_path / "out", "--verbose")
    assert "[Paddle2ONNX]" in result.stdout
    assert "fusion_base" in result.stderr and "Warning" in result.stderr
    assert "export parity vs teacher" in result.stderr and "ONNX INT8 (" in result.stderr
