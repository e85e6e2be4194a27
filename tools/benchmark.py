#!/usr/bin/env python
"""Accuracy, size and speed of the teacher and every exported width (FP32, INT8, ONNX Runtime), side by side."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.commands import stages  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(stages.benchmark_cli)
