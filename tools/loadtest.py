#!/usr/bin/env python
"""Load-test tools/serve.py with Locust on 127.0.0.1: req/s, sentences/s, p50/p95/p99, errors, server RSS."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KMP_BLOCKTIME", "0")  # as tools/serve.py sets it: offline and served run alike

from ner_compress.core.config import add_dataclass_flags, options_from_args  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402
from ner_compress.core.runtime import setup_logging  # noqa: E402
from ner_compress.measure.loadtest import LoadtestOptions, run  # noqa: E402


def parse_args(argv=None):
    parser = add_dataclass_flags(argparse.ArgumentParser(description=__doc__), LoadtestOptions)
    return options_from_args(LoadtestOptions, parser.parse_args(argv))


def main(argv=None):
    opts = parse_args(argv)
    setup_logging("info")
    results = run(opts, "python tools/loadtest.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(results["markdown"])


if __name__ == "__main__":
    run_cli(main)
