#!/usr/bin/env python
"""Serve an exported static model over HTTP: POST /predict, GET /health, /ready, /metrics, /docs."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# before paddle loads OpenMP: idle math threads sleep at once instead of spinning for 200 ms, which on a
# small machine took the cores the event loop needs between batches (a user's own setting wins)
os.environ.setdefault("KMP_BLOCKTIME", "0")

from ner_compress.config import add_dataclass_flags  # noqa: E402
from ner_compress.errors import run_cli  # noqa: E402
from ner_compress.serving import ServeOptions, serve  # noqa: E402


def main(argv=None):
    parser = add_dataclass_flags(argparse.ArgumentParser(description=__doc__), ServeOptions)
    serve(ServeOptions(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    run_cli(main)
