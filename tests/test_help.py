"""Every tool's --help gives help text for every flag it offers."""
import os
import re

import pytest

from conftest import ROOT, run_tool

TOOLS = sorted(name for name in os.listdir(os.path.join(ROOT, "tools")) if name.endswith(".py"))


def flags_without_help(text):
    """Option entries of an argparse help page that carry no text after their flag and metavar."""
    section = text.split("options:", 1)[1] if "options:" in text else text
    entries, current = [], None
    for line in section.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith(" " * 10) and line.strip():
            current.append(line)
        elif not line.strip():
            current = None
    return [e[0].split()[0].rstrip(",") for e in entries
            if len(e) == 1 and len(re.split(r"\s{2,}", e[0].strip())) < 2]


def test_the_help_parser_sees_a_flag_without_help():
    page = "options:\n  -h, --help            show this help\n  --bare BARE\n  --ok OK               fine\n"
    assert flags_without_help(page) == ["--bare"]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_of_every_tool_has_help(tool):
    page = run_tool(tool, "--help").stdout
    assert "usage:" in page
    assert flags_without_help(page) == []
