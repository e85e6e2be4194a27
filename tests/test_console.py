"""The console: known-harmless third-party warnings and INFO lines are silenced at their source unless
--verbose (or NER_COMPRESS_VERBOSE=1) asks for everything."""
import logging
import os

from conftest import run_tool
from ner_compress.core import console


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
