#!/usr/bin/env python
"""Stage 7: tag texts with an exported model (ONNX Runtime or Paddle Inference); one JSON object per text."""
import argparse
import os
import sys
from dataclasses import fields

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.core.errors import run_cli  # noqa: E402
from ner_compress.deploy.predict_io import DEFAULT_MAX_CHARS, emit, tag_input  # noqa: E402


def parse_args(argv=None):
    from ner_compress.core.config import add_dataclass_flags
    from ner_compress.deploy.backends import EngineOptions

    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to tag (repeatable)")
    source.add_argument("--input_file", help="UTF-8 file, one text per line; '-' for stdin")
    add_dataclass_flags(parser, EngineOptions)
    parser.add_argument("--batch_size", type=int, default=32, help="texts per model call (--input_file)")
    parser.add_argument("--max_chars", type=int, default=DEFAULT_MAX_CHARS, help="longest line accepted")
    args = parser.parse_args(argv)
    engine = EngineOptions(**{f.name: getattr(args, f.name) for f in fields(EngineOptions)})
    return args, engine


def main(argv=None):
    args, engine = parse_args(argv)
    tagger = engine.tagger(args.batch_size)
    if args.text:
        emit(tagger.predict(args.text))
    else:
        tag_input(tagger, args.input_file, args.batch_size, args.max_chars)


if __name__ == "__main__":
    run_cli(main)
