#!/usr/bin/env python
"""All stages on one config (default configs/demo.yaml), then a test-set table of teacher and widths."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.commands import pipeline  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(pipeline.run_all_cli)
