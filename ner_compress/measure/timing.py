"""Latency and throughput measurements shared by the benchmark and the load test.

One percentile definition everywhere: linear interpolation between the closest ranks, numpy's
default (``np.percentile(..., method="linear")``); p50 is then the median.
"""
import statistics
import time

import numpy as np


def percentile(values, q):
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype="float64"), q, method="linear"))


def latency_summary(timings_ms, key="latency_ms_{}"):
    """p50/p95/p99 of per-call milliseconds, keyed ``key.format("p50")`` etc."""
    return {key.format(f"p{q}"): percentile(timings_ms, q) for q in (50, 95, 99)}


def call_ms(calls, warmup=10):
    """Milliseconds of each call in ``calls`` (zero-argument callables) after the first ``warmup``
    of them ran untimed."""
    timings = []
    for i, call in enumerate(calls):
        start = time.perf_counter()
        call()
        if i >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    return timings


def repeat_seconds(run_once, repeats):
    """Wall seconds of each of ``repeats`` calls of ``run_once`` after one untimed warm-up call."""
    run_once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(run_once, repeats):
    """Median wall seconds of ``repeats`` calls of ``run_once`` after one untimed warm-up call."""
    return statistics.median(repeat_seconds(run_once, repeats))
