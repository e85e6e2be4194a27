"""Serve an exported static model over HTTP: POST /predict, GET /health, /ready, /metrics, /docs.

``python -m ner_compress.serve`` (what ``tools/serve.py`` and the load test's child server run);
the flags are ``ServeOptions``'s fields.
"""
import argparse
import os

# before paddle loads OpenMP: idle math threads sleep at once instead of spinning for 200 ms, which on a
# small machine took the cores the event loop needs between batches (a user's own setting wins)
os.environ.setdefault("KMP_BLOCKTIME", "0")

from ner_compress.core.config import add_dataclass_flags  # noqa: E402
from ner_compress.core.errors import run_cli  # noqa: E402
from ner_compress.serve.service import ServeOptions, serve  # noqa: E402


def main(argv=None):
    parser = add_dataclass_flags(argparse.ArgumentParser(description=__doc__.split("\n")[0]), ServeOptions)
    serve(ServeOptions(**vars(parser.parse_args(argv))))


def cli():
    """The ``ner-compress-serve`` console script of an installed package."""
    run_cli(main)


if __name__ == "__main__":
    cli()
