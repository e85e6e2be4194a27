#!/usr/bin/env python
"""Stage 7: tag texts with an exported model (ONNX Runtime or Paddle Inference); one JSON object per text."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.core.errors import run_cli  # noqa: E402
from ner_compress.deploy.predict_io import PredictOptions, predict  # noqa: E402


def parse_args(argv=None):
    from ner_compress.core.config import add_dataclass_flags, options_from_args
    from ner_compress.deploy.backends import EngineOptions

    parser = argparse.ArgumentParser(description=__doc__)
    add_dataclass_flags(parser, PredictOptions)
    add_dataclass_flags(parser, EngineOptions)
    args = parser.parse_args(argv)
    return options_from_args(PredictOptions, args), options_from_args(EngineOptions, args)


def main(argv=None):
    predict(*parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
