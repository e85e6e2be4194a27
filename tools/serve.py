#!/usr/bin/env python
"""Serve an exported static model over HTTP: POST /predict, GET /health, /ready, /metrics, /docs."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# before paddle loads OpenMP: idle math threads sleep at once instead of spinning for 200 ms, which on a
# small machine took the cores the event loop needs between batches (a user's own setting wins)
os.environ.setdefault("KMP_BLOCKTIME", "0")

from ner_compress.errors import run_cli  # noqa: E402
from ner_compress.serving import ServeOptions, serve  # noqa: E402

DEFAULTS = ServeOptions(model_dir="")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", required=True, help="DIR/export/width_W/static (or export/teacher/static)")
    parser.add_argument("--host", default=DEFAULTS.host)
    parser.add_argument("--port", type=int, default=DEFAULTS.port)
    parser.add_argument("--workers", type=int, default=DEFAULTS.workers,
                        help="processes, each with its own model copy and batching (default 1)")
    parser.add_argument("--backend", default=None, help="onnxruntime or paddle (Paddle Inference); default: "
                        f"{DEFAULTS.backend} on CPU, paddle on GPU")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=DEFAULTS.device)
    parser.add_argument("--precision", default=DEFAULTS.precision,
                        help="fp32 (default; ONNX Runtime: the fused graph) or int8 (ONNX Runtime's model.int8.onnx)")
    parser.add_argument("--cpu_threads", type=int, default=None, help="predictor math threads; default: all cores")
    parser.add_argument("--decoding", default=DEFAULTS.decoding, help="viterbi (BIO-constrained, default) or argmax")
    parser.add_argument("--max_batch_size", type=int, default=DEFAULTS.max_batch_size,
                        help="texts gathered from concurrent requests into one predictor call")
    parser.add_argument("--max_wait_ms", type=float, default=DEFAULTS.max_wait_ms,
                        help="longest wait for more texts under concurrent load (none for a lone client)")
    parser.add_argument("--max_queue", type=int, default=DEFAULTS.max_queue,
                        help="texts accepted and not yet answered; beyond it 503 with Retry-After")
    parser.add_argument("--max_body_bytes", type=int, default=DEFAULTS.max_body_bytes, help="larger bodies: 413")
    parser.add_argument("--max_texts", type=int, default=DEFAULTS.max_texts, help="texts per request; more: 413")
    parser.add_argument("--max_chars", type=int, default=DEFAULTS.max_chars, help="characters per text; more: 413")
    parser.add_argument("--body_timeout_s", type=float, default=DEFAULTS.body_timeout_s,
                        help="a body not complete this long after its headers: 408, connection closed")
    parser.add_argument("--max_connections", type=int, default=DEFAULTS.max_connections,
                        help="open connections served per worker; a request on one more: 503, connection closed")
    parser.add_argument("--warmup_batches", type=int, default=DEFAULTS.warmup_batches,
                        help="predictor calls before /ready says 200")
    parser.add_argument("--log_level", default=DEFAULTS.log_level, choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv=None):
    serve(ServeOptions(**vars(parse_args(argv))))


if __name__ == "__main__":
    run_cli(main)
