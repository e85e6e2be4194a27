#!/usr/bin/env python
"""Stage 8: the sub-network with the best dev F1 within a latency budget (per-layer heads and neurons)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.commands import search  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(search.search_cli)
