#!/usr/bin/env python
"""Load-test tools/serve.py with Locust on 127.0.0.1: req/s, sentences/s, p50/p95/p99, errors, server RSS."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KMP_BLOCKTIME", "0")  # as tools/serve.py sets it: offline and served run alike

from ner_compress.core.errors import UserError, run_cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="output", help="reads DIR/export/*, writes DIR/report/loadtest.*")
    parser.add_argument("--model_dir", action="append",
                        help="a static model dir (repeatable); default: teacher and width 0.5 under --output_dir")
    parser.add_argument("--backend", default=None,
                        help="onnxruntime or paddle (default: the server's, ONNX Runtime on CPU)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--seconds", type=int, default=20, help="length of each level")
    parser.add_argument("--max_requests", type=int, default=50_000, help="requests per level at most")
    parser.add_argument("--sentences", type=int, default=2000, help="MSRA test sentences to send")
    parser.add_argument("--locust_python", default=sys.executable, help="a Python with locust installed")
    parser.add_argument("--no_abuse", action="store_true", help="skip the abusive-request checks")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if min(args.clients) < 1 or args.seconds < 1 or args.max_requests < 1 or args.sentences < 1:
        raise UserError("--clients, --seconds, --max_requests and --sentences: must be at least 1")
    from ner_compress.deploy.backends import DEFAULT_BACKEND
    from ner_compress.measure.loadtest import models_to_test, run
    from ner_compress.core.runtime import setup_logging

    setup_logging("info")
    results = run({"output_dir": args.output_dir, "models": models_to_test(args.output_dir, args.model_dir),
                   "clients": args.clients, "seconds": args.seconds, "max_requests": args.max_requests, "sentences": args.sentences,
                   "backend": args.backend or DEFAULT_BACKEND,
                   "locust_python": args.locust_python, "abuse": not args.no_abuse,
                   "command": "python tools/loadtest.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    print(results["markdown"])


if __name__ == "__main__":
    run_cli(main)
