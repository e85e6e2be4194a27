"""Side-by-side figures for exported models: test-set scores, size and static-graph latency."""
import os
import statistics
import time

from .artifacts import read_manifest
from .inference import StaticTagger
from .metrics import entity_scores


def score_static(tagger, sentences):
    """Entity scores of a static model on ``sentences`` and the seconds it took to tag them all."""
    start = time.perf_counter()
    pred = tagger.tag_sentences(sentences)
    seconds = time.perf_counter() - start
    return entity_scores([s.tags for s in sentences], pred), seconds


def batch1_latency_ms(tagger, sentences, n=100, warmup=10):
    """Median and p95 milliseconds to tag one sentence at batch 1 (warm-up runs excluded)."""
    sample = sentences[: n + warmup]
    timings = []
    for i, sentence in enumerate(sample):
        start = time.perf_counter()
        tagger.tag_sentences([sentence])
        if i >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    return statistics.median(timings), timings[min(len(timings) - 1, int(0.95 * len(timings)))]


def measure_export(name, export_dir, sentences, threads=None, device="cpu"):
    static_dir = os.path.join(export_dir, "static")
    manifest = read_manifest(static_dir, "export")
    tagger = StaticTagger(static_dir, device=device, threads=threads)
    scores, seconds = score_static(tagger, sentences)
    p50, p95 = batch1_latency_ms(tagger, sentences)
    return {"model": name, "width_mult": manifest.get("width_mult"), "parameters": manifest.get("parameters"),
            "precision": scores["precision"], "recall": scores["recall"], "f1": scores["f1"],
            "per_type": scores["per_type"], "test_seconds": seconds, "latency_ms_p50": p50, "latency_ms_p95": p95}


def table(rows):
    """A Markdown table; F1 share and speed-up are relative to the first row (the teacher)."""
    base = rows[0]
    lines = ["| model | params | P | R | F1 | F1 / teacher | latency p50 ms | speed-up | test set s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = r["f1"] / base["f1"] if base["f1"] else float("nan")
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['precision']:.4f} | {r['recall']:.4f} | "
                     f"{r['f1']:.4f} | {share:.2%} | {r['latency_ms_p50']:.2f} | "
                     f"{base['latency_ms_p50'] / r['latency_ms_p50']:.2f}x | {r['test_seconds']:.1f} |")
    return "\n".join(lines)
