#!/usr/bin/env python
"""Stage 6: export a model (a width of a supernet, the teacher or the student) under DIR/export/: dynamic
graph, static graph, and ONNX (FP32, fused FP32 and INT8), each checked against the model it came from."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.commands import stages  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(stages.export_cli)
