#!/usr/bin/env python
"""Stage 5: refit a width (or the student) layer by layer against the teacher, on training sentences."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.commands import stages  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(stages.reconstruct_cli)
