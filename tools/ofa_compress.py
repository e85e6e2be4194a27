#!/usr/bin/env python
"""Stage 3: OFA width supernet distilled from DIR/teacher/ (or --from student); the best weights per width go to
DIR/ofa/."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.commands import stages  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(stages.ofa_compress_cli)
