#!/usr/bin/env python
"""Tag texts with an exported model (ONNX Runtime or Paddle Inference); one JSON object per text."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ner_compress.core.errors import run_cli  # noqa: E402
from ner_compress.deploy.predict_io import DEFAULT_MAX_CHARS, emit, tag_input  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", required=True, help="DIR/export/width_W/static (or export/teacher/static)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to tag (repeatable)")
    source.add_argument("--input_file", help="UTF-8 file, one text per line; '-' for stdin")
    parser.add_argument("--backend", default=None,
                        help="onnxruntime (default on CPU: the export's onnx/model.onnx) or paddle (Paddle Inference)")
    parser.add_argument("--precision", default="fp32",
                        help="fp32 (default), int8 (ONNX Runtime's onnx/model.int8.onnx from tools/export.py) or "
                             "fp16 (Paddle Inference on GPU)")
    parser.add_argument("--tensorrt", action="store_true",
                        help="Paddle Inference on GPU: run through a TensorRT engine at --precision")
    parser.add_argument("--decoding", default="viterbi", help="viterbi (BIO-constrained, default) or argmax")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--cpu_threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_chars", type=int, default=DEFAULT_MAX_CHARS, help="longest line accepted")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from ner_compress.deploy.backends import load_tagger

    tagger = load_tagger(args.model_dir, args.backend, args.device, args.cpu_threads, args.batch_size, args.decoding,
                         args.precision, args.tensorrt)
    if args.text:
        emit(tagger.predict(args.text))
    else:
        tag_input(tagger, args.input_file, args.batch_size, args.max_chars)


if __name__ == "__main__":
    run_cli(main)
