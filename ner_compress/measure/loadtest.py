"""Load test of ``tools/serve.py`` with Locust: served throughput and latency against offline figures.

For each model: the offline figures first (``Tagger.predict`` in this process, batch 32 and batch
1, on the same sentences), then the server on a free 127.0.0.1 port, Locust headless with C
closed-loop clients (one MSRA test sentence per request) for a bounded time and request count,
the server's resident memory sampled throughout, and the abusive requests of ``abuse_checks``.
Writes ``DIR/report/loadtest.md`` and ``loadtest.json``.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ner_compress.core import layout
from ner_compress.core.options import flag_field
from ner_compress.core.errors import UserError
from ner_compress.core.layout import ModelRef
from ner_compress.deploy.backends import DEFAULT_BACKEND
from ner_compress.measure import timing
from ner_compress.measure.targets import target, target_lines
from ner_compress.measure.server_process import ServerProcess
from ner_compress.measure.server_probes import abuse_checks

log = logging.getLogger("ner_compress")
LOCUSTFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locustfile.py")
MB = 1024 * 1024
BODY_TIMEOUT_S = 3  # the served --body_timeout_s: the abuse checks' stalled client waits that long


@dataclass
class LoadtestOptions:
    """What ``tools/loadtest.py`` serves and how hard it loads it (``config.add_dataclass_flags``)."""
    output_dir: str = flag_field("output", "reads DIR/export/*, writes DIR/report/loadtest.*")
    model_dir: Optional[List[str]] = flag_field(
        None, "a static model dir (repeatable); default: teacher and width 0.5 under --output_dir", action="append")
    backend: Optional[str] = flag_field(None, "onnxruntime or paddle (default: the server's, ONNX Runtime on CPU)")
    clients: List[int] = flag_field([1, 8, 32], "concurrent clients per level", nargs="+")
    seconds: int = flag_field(20, "length of each level")
    max_requests: int = flag_field(50_000, "requests per level at most")
    sentences: int = flag_field(2000, "MSRA test sentences to send")
    locust_python: str = flag_field(sys.executable, "a Python with locust installed")
    no_abuse: bool = flag_field(False, "skip the abusive-request checks")


def models_to_test(output_dir, model_dirs=None):
    """[(name, static dir)]: ``model_dirs`` named by their export directory, or else the teacher and
    width 0.5 exported under ``output_dir``."""
    if model_dirs:
        return [(os.path.basename(os.path.dirname(os.path.abspath(d))), d) for d in model_dirs]
    found = [(ref.name, os.path.join(layout.export_dir(output_dir, ref), "static"))
             for ref in (ModelRef("teacher"), ModelRef("teacher", 0.5))]
    found = [(name, path) for name, path in found if os.path.isdir(path)]
    if not found:
        raise UserError(f"--output_dir {output_dir}: no export/teacher/static or export/width_0.5/static; run "
                        "`python tools/export.py` (and `--teacher`) first, or pass --model_dir")
    return found


def msra_test_sentences(limit):
    from ner_compress.core.config import Config
    from ner_compress.data.corpus import load_splits

    return ["".join(s.chars) for s in load_splits(Config()).test[:limit]]


# --- offline reference ---------------------------------------------------------------------------

def offline_figures(model_dir, backend, sentences, batch_size=32, repeats=3, latency_sentences=200):
    """``Tagger.predict`` here, no HTTP: sentences/s at ``batch_size`` and p50 ms at batch 1."""
    from ner_compress.deploy.backends import load_tagger

    tagger = load_tagger(model_dir, backend, batch_size=batch_size)
    chunks = [sentences[i: i + batch_size] for i in range(0, len(sentences), batch_size)]

    def one_pass():
        for chunk in chunks:
            tagger.predict(chunk)

    seconds = timing.median_seconds(one_pass, repeats)
    # batch 1: 10 untimed calls, then latency_sentences timed ones
    timings = timing.call_ms([lambda s=s: tagger.predict([s]) for s in sentences[: latency_sentences + 10]])
    return {"offline_sentences_per_s": len(sentences) / seconds, "offline_b1_p50_ms": timing.percentile(timings, 50)}


# --- one load level ------------------------------------------------------------------------------

class RssSampler:
    """The server's peak resident memory while a block runs."""

    def __init__(self, server, every_s=0.25):
        self.server, self.every_s, self.peak = server, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_bytes() or 0)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def locust_level(server, clients, seconds, max_requests, sentences_file, work_dir, locust_python):
    """Locust headless with ``clients`` users; figures from its per-request samples."""
    samples_file = os.path.join(work_dir, f"samples-{clients}.json")
    command = [locust_python, "-m", "locust", "-f", LOCUSTFILE, "--headless", "--users", str(clients),
               "--spawn-rate", str(clients), "--run-time", f"{seconds}s", "--host", server.url, "--only-summary",
               "--stop-timeout", "10", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    env = {**os.environ, "NER_LOADTEST_SENTENCES": sentences_file, "NER_LOADTEST_SAMPLES": samples_file,
           "NER_LOADTEST_MAX_REQUESTS": str(max_requests)}
    with RssSampler(server) as rss:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if result.returncode != 0 or not os.path.exists(samples_file):
        raise RuntimeError(f"locust exited {result.returncode}:\n{result.stderr[-3000:]}")
    with open(samples_file, encoding="utf-8") as fh:
        samples = json.load(fh)
    return {"clients": clients, **summarize(samples), "server_rss_peak_mb": rss.peak / MB}


def summarize(samples):
    """Requests, rate and latency percentiles from (start s, latency ms, error) samples."""
    if not samples:
        return {"requests": 0, "errors": 0}
    starts = np.array([s[0] for s in samples])
    latency = np.array([s[1] for s in samples])
    errors = [s[2] for s in samples if s[2]]
    elapsed = float(np.max(starts + latency / 1000) - np.min(starts))
    ok = len(samples) - len(errors)
    return {"requests": len(samples), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": elapsed, "requests_per_s": len(samples) / elapsed, "sentences_per_s": ok / elapsed,
            **timing.latency_summary(latency, key="{}_ms")}


# --- the run ---------------------------------------------------------------------------------

def locust_python_or_fail(python):
    if python == sys.executable and importlib.util.find_spec("locust") is None:
        raise UserError("locust is not installed in this environment: `pip install -r requirements.txt` "
                        "(locust==2.47.0), or pass --locust_python")
    return python


def run(opts, command):
    """The load test ``opts`` (a ``LoadtestOptions``) asks for, ``command`` the line that asked. Returns the
    results written to DIR/report/loadtest.{md,json}."""
    if min(opts.clients) < 1 or opts.seconds < 1 or opts.max_requests < 1 or opts.sentences < 1:
        raise UserError("--clients, --seconds, --max_requests and --sentences: must be at least 1")
    models, backend = models_to_test(opts.output_dir, opts.model_dir), opts.backend or DEFAULT_BACKEND
    locust_python = locust_python_or_fail(opts.locust_python)
    report_dir = os.path.join(opts.output_dir, "report")
    os.makedirs(report_dir, exist_ok=True)
    sentences = msra_test_sentences(opts.sentences)
    results = {"command": command, "clients": opts.clients, "seconds": opts.seconds, "sentences": len(sentences),
               "backend": backend, "cores": os.cpu_count(), "load_average": os.getloadavg(), "models": []}
    with tempfile.TemporaryDirectory() as work_dir:
        sentences_file = os.path.join(work_dir, "sentences.json")
        with open(sentences_file, "w", encoding="utf-8") as fh:
            json.dump(sentences, fh, ensure_ascii=False)
        for name, model_dir in models:
            log.info("%s: offline reference", name)
            model = {"model": name, "model_dir": model_dir, **offline_figures(model_dir, backend, sentences)}
            server = ServerProcess(model_dir, "--backend", backend, "--body_timeout_s", BODY_TIMEOUT_S,
                                   log_path=os.path.join(work_dir, "srv.log"))
            with server:
                model["idle_rss_mb"] = server.rss_bytes() / MB
                model["levels"] = []
                for clients in opts.clients:
                    log.info("%s: %d clients for %d s", name, clients, opts.seconds)
                    model["levels"].append(locust_level(server, clients, opts.seconds, opts.max_requests,
                                                        sentences_file, work_dir, locust_python))
                if not opts.no_abuse and name == models[-1][0]:
                    log.info("%s: abusive requests", name)
                    model["abuse"] = abuse_checks(server, BODY_TIMEOUT_S)
            results["models"].append(model)
    results["targets"] = targets(results["models"])
    results["markdown"] = markdown(results)
    with open(os.path.join(report_dir, "loadtest.json"), "w", encoding="utf-8") as fh:
        json.dump({k: v for k, v in results.items() if k != "markdown"}, fh, indent=2, ensure_ascii=False)
    with open(os.path.join(report_dir, "loadtest.md"), "w", encoding="utf-8") as fh:
        fh.write(results["markdown"])
    return results


def targets(models):
    checks = []
    for m in models:
        by_clients = {level["clients"]: level for level in m["levels"]}
        if 32 in by_clients:
            top = by_clients[32]
            share = top["sentences_per_s"] / m["offline_sentences_per_s"]
            checks += [(f"{m['model']}, 32 clients: >= 70% of offline batch-32 sentences/s", f"{share:.0%}",
                        share >= 0.7),
                       (f"{m['model']}, 32 clients: p99 <= 100 ms", f"{top['p99_ms']:.1f} ms", top["p99_ms"] <= 100),
                       (f"{m['model']}, 32 clients: 0 errors", str(top["errors"]), top["errors"] == 0)]
        if 1 in by_clients:
            gap = by_clients[1]["p50_ms"] - m["offline_b1_p50_ms"]
            checks.append((f"{m['model']}, 1 client: p50 within 1.5 ms of offline batch-1 p50", f"{gap:+.2f} ms",
                           gap <= 1.5))
        if m.get("abuse"):
            growth = max(row["rss_mb"] for row in m["abuse"]) - m["idle_rss_mb"]
            ok = all(row["as_expected"] for row in m["abuse"])
            checks += [(f"{m['model']}, abusive requests: each answered as expected, then a normal one",
                        "yes" if ok else "no", ok),
                       (f"{m['model']}, abusive requests: RSS within 200 MB of idle", f"{growth:+.0f} MB",
                        growth <= 200)]
    return [target(*check) for check in checks]


def markdown(results):
    lines = ["# Load test: tools/serve.py under Locust", "",
             f"Command: `{results['command']}`  ",
             f"{results['cores']} cores; load average at the start {results['load_average'][0]:.1f}; backend "
             f"{results.get('backend', '?')}; {results['sentences']} MSRA test sentences, one per request, closed-loop "
             f"clients, {results['seconds']} s per level. Offline = `Tagger.predict` in the load-test process, same "
             "sentences.",
             "", "| model | clients | requests | req/s | sent/s | p50 ms | p95 ms | p99 ms | errors | server RSS MB "
             "(peak) | offline sent/s (b=32) | served / offline | offline p50 ms (b=1) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results["models"]:
        for level in m["levels"]:
            lines.append(
                f"| {m['model']} | {level['clients']} | {level['requests']} | {level['requests_per_s']:.0f} | "
                f"{level['sentences_per_s']:.0f} | {level['p50_ms']:.1f} | {level['p95_ms']:.1f} | "
                f"{level['p99_ms']:.1f} | {level['errors']} | {level['server_rss_peak_mb']:.0f} | "
                f"{m['offline_sentences_per_s']:.0f} | {level['sentences_per_s'] / m['offline_sentences_per_s']:.0%} | "
                f"{m['offline_b1_p50_ms']:.2f} |")
    for m in results["models"]:
        if m.get("abuse"):
            lines += ["", f"## Abusive requests ({m['model']}, idle RSS {m['idle_rss_mb']:.0f} MB)", "",
                      "| request | status | answer | RSS after MB |", "|---|---:|---|---:|"]
            lines += [f"| {row['case']} | {row['status']} | {row['answer']} | {row['rss_mb']:.0f} |"
                      for row in m["abuse"]]
    return "\n".join(lines + target_lines(results["targets"])) + "\n"
