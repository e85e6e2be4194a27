"""The HTTP service (``python -m ner_compress.serve``): FastAPI routes, dynamic batching onto one tagger
thread, limits, Prometheus counters. Stands on ``deploy`` and below."""
