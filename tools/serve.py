#!/usr/bin/env python
"""Serve an exported static model over HTTP: POST /predict, GET /health, /ready, /metrics, /docs."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    runpy.run_module("ner_compress.serve", run_name="__main__", alter_sys=True)
