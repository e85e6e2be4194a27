"""Accuracy, size and speed of the teacher and every exported width, measured side by side.

Backends: Paddle Inference FP32, Paddle Inference INT8 (post-training quantization, oneDNN),
ONNX Runtime (the export's ``onnx/model.onnx``), and the dynamic graph for comparison. Batch-1
latency is per real test sentence in the test set's order and lengths (p50/p95/p99 after a
warm-up); batch throughput is the median of repeated runs over length-sorted and unsorted
batches. ``report`` renders the figures.
"""
import json
import os
import platform
import statistics
import time

import numpy as np
import paddle

from .artifacts import read_manifest
from .backends import (DEFAULT_BACKEND, DynamicTagger, OnnxTagger, StaticTagger, check_backend, load_tagger,
                       onnx_path_for)
from .static_files import PIR_PROGRAM, static_model_files
from .metrics import entity_scores
from .export import max_abs_diff, trained_widths


def export_dirs(output_dir):
    """[(name, export dir)]: the teacher first, then widths from widest to narrowest; then the same
    for the student (``student``, ``student width W``)."""
    root = os.path.join(output_dir, "export")
    found = []
    for model, prefix in (("teacher", ""), ("student", "student_")):
        if os.path.isdir(os.path.join(root, model, "static")):
            found.append((model, os.path.join(root, model)))
        widths = sorted(trained_widths(root, "static", f"{prefix}width_"), reverse=True)
        found += [(f"{prefix.replace('_', ' ')}width {w}", os.path.join(root, f"{prefix}width_{w}")) for w in widths]
    return found


# --- backends --------------------------------------------------------------------------------

class CalibrationLoader(paddle.io.DataLoader):
    """Feed dicts for ``PostTrainingQuantization``, which on Paddle 2.6.2 only takes a
    ``paddle.io.DataLoader`` and calls it (``loader()``) for an iterable of feeds."""

    def __init__(self, feeds):  # no super().__init__: nothing to load, the feeds are ready
        self.feeds = feeds

    def __call__(self):
        return iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def int8_unavailable(static_dir):
    """Why ``quantize_int8`` cannot run on this export, or ``None``: Paddle 3.3's post-training
    quantization builds old-IR programs and fails on a PIR ``model.json`` (measured, 3.3.1)."""
    program, _ = static_model_files(static_dir)
    if program.endswith(PIR_PROGRAM):
        return f"INT8 skipped: post-training quantization cannot read a PIR program ({program})"
    return None


def quantize_int8(static_dir, out_dir, calibration_feeds):
    """Post-training INT8 quantization of a static model (matmul weights and activations)."""
    from paddle.static.quantization import PostTrainingQuantization

    program, params = (os.path.basename(path) for path in static_model_files(static_dir))
    paddle.enable_static()
    try:
        ptq = PostTrainingQuantization(
            executor=paddle.static.Executor(paddle.CPUPlace()), model_dir=static_dir,
            model_filename=program, params_filename=params,
            data_loader=CalibrationLoader(calibration_feeds), batch_nums=len(calibration_feeds),
            algo="hist", quantizable_op_type=["matmul_v2", "matmul", "mul"], onnx_format=True)
        ptq.quantize()
        ptq.save_quantized_model(out_dir, model_filename=program, params_filename=params)
    finally:
        paddle.disable_static()
    for name in ("vocab.txt", "inference.json"):
        with open(os.path.join(static_dir, name), "rb") as src, open(os.path.join(out_dir, name), "wb") as dst:
            dst.write(src.read())
    return out_dir


# --- measurements ------------------------------------------------------------------------------

def accuracy(tagger, sentences):
    """Entity scores on ``sentences``; ``tags`` (the predictions) is dropped from saved rows."""
    start = time.perf_counter()
    pred = tagger.tag_sentences(sentences)
    seconds = time.perf_counter() - start
    return {**entity_scores([s.tags for s in sentences], pred), "test_seconds": seconds, "tags": pred}


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def latency_ms(tagger, sentences, warmup=10):
    """p50/p95/p99 milliseconds per sentence at batch 1, text to tags, in the sentences' own order."""
    for sentence in sentences[:warmup]:
        tagger.tag_sentences([sentence])
    timings = []
    for sentence in sentences:
        start = time.perf_counter()
        tagger.tag_sentences([sentence])
        timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    return {"latency_ms_p50": statistics.median(timings), "latency_ms_p95": percentile(timings, 0.95),
            "latency_ms_p99": percentile(timings, 0.99), "latency_sentences": len(timings)}


def fixed_batches(tagger, sentences, batch_size, sort=True):
    """Model inputs of ``batch_size`` windows, padded as the tagger pads them; length-sorted or in order."""
    windows = tagger.windows(sentences)
    order = list(range(len(windows)))
    if sort:
        order.sort(key=lambda i: len(windows[i].input_ids))
    return [tagger.batch([windows[i] for i in order[j: j + batch_size]]) for j in range(0, len(order), batch_size)]


def throughput(tagger, sentences, batch_size=32, repeats=3):
    """Sentences/s and characters/s at ``batch_size`` over length-sorted batches (and unsorted:
    ``unsorted_sentences_per_s``), median of ``repeats`` runs after one warm-up."""
    result = batch_speed(tagger, sentences, fixed_batches(tagger, sentences, batch_size), repeats)
    unsorted = batch_speed(tagger, sentences, fixed_batches(tagger, sentences, batch_size, sort=False), repeats)
    result["unsorted_sentences_per_s"] = unsorted["sentences_per_s"]
    return result


def batch_speed(tagger, sentences, batches, repeats):
    chars = sum(len(s.chars) for s in sentences)

    def run_once():
        start = time.perf_counter()
        for b in batches:
            tagger.logits(b["input_ids"], b["token_type_ids"])
        return time.perf_counter() - start

    run_once()
    seconds = statistics.median(run_once() for _ in range(repeats))
    return {"sentences_per_s": len(sentences) / seconds, "chars_per_s": chars / seconds, "batch_seconds": seconds,
            "tokens": int(sum(b["input_ids"].size for b in batches))}


def tags_differ(rows_a, rows_b):
    """Sentences whose predicted tags differ between two backends' ``accuracy`` results."""
    return sum(a != b for a, b in zip(rows_a, rows_b))


def sample_logits_diff(a, b, sentences, batch_size=32):
    batch = fixed_batches(a, sentences[:batch_size], batch_size)[0]
    return max_abs_diff(a.logits(batch["input_ids"], batch["token_type_ids"]),
                        b.logits(batch["input_ids"], batch["token_type_ids"]))


def model_shape(export_dir):
    with open(os.path.join(export_dir, "dynamic", "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    width = float(config.get("width_mult", 1.0))
    heads = int(config["num_attention_heads"] * width)
    return {"hidden": config["hidden_size"], "layers": config["num_hidden_layers"],
            "attn_inner": heads * config["hidden_size"] // config["num_attention_heads"],
            "ffn": int(config["intermediate_size"] * width), "labels": len(config.get("id2label", {})) or 7}


def forward_flops(shape, batches):
    """Multiply-adds x2 of one forward over padded batches: projections, attention, FFN, classifier."""
    total = 0
    for b in batches:
        n, t = b["input_ids"].shape
        per_layer = 2 * n * t * shape["hidden"] * (4 * shape["attn_inner"] + 2 * shape["ffn"]) \
            + 4 * n * t * t * shape["attn_inner"]
        total += shape["layers"] * per_layer + 2 * n * t * shape["hidden"] * shape["labels"]
    return total


def matmul_gflops(threads=None, size=1024, repeats=10):
    """The machine's float32 matrix-multiply ceiling (numpy BLAS), median of repeats."""
    from threadpoolctl import threadpool_limits

    a = np.random.rand(size, size).astype("float32")
    b = np.random.rand(size, size).astype("float32")
    with threadpool_limits(limits=threads or os.cpu_count()):
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def machine_info():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("paddlepaddle", "paddlenlp", "paddleslim", "numpy", "onnxruntime", "paddle2onnx"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions}


def disk_bytes(static_dir):
    return sum(os.path.getsize(path) for path in static_model_files(static_dir))


def parameters(export_dir):
    return read_manifest(os.path.join(export_dir, "static"), "export").get("parameters")


# --- the run -----------------------------------------------------------------------------------

def measure_model(name, export_dir, sentences, work_dir, opts, progress):
    """Every figure of one exported model on each backend in ``opts["backends"]``: Paddle Inference
    FP32 (with the dynamic graph beside it) and INT8 for "paddle", ONNX Runtime for "onnxruntime"."""
    static_dir = os.path.join(export_dir, "static")
    base = {"model": name, "width_mult": export_dir_width(name), "parameters": parameters(export_dir)}
    fp32 = StaticTagger(static_dir, threads=opts["threads"], batch_size=opts["batch_size"])
    reference = accuracy(fp32, sentences)  # every backend's tags are compared with Paddle Inference FP32's
    rows = []
    if "paddle" in opts["backends"]:
        progress(f"{name}: Paddle Inference")
        row = speed_row(fp32, {**base, "precision_kind": "fp32", "backend": "paddle",
                               "disk_bytes": disk_bytes(static_dir), **reference}, sentences, opts)
        row["gflops_achieved"] = forward_flops(model_shape(export_dir), fixed_batches(
            fp32, sentences[: opts["speed_sentences"]], opts["batch_size"])) / row["batch_seconds"] / 1e9
        progress(f"{name}: dynamic graph")
        row["dynamic_sentences_per_s"] = throughput(DynamicTagger(export_dir, opts["batch_size"]),
                                                    sentences[: opts["speed_sentences"]], opts["batch_size"],
                                                    opts["repeats"])["sentences_per_s"]
        rows.append(row)
    if "onnxruntime" in opts["backends"]:
        progress(f"{name}: ONNX Runtime")
        check_backend("onnxruntime", static_dir)
        ort = OnnxTagger(static_dir, threads=opts["threads"], batch_size=opts["batch_size"])
        row = {**base, "precision_kind": "onnxruntime-fp32", "backend": "onnxruntime",
               "disk_bytes": os.path.getsize(onnx_path_for(static_dir)),
               "max_abs_diff_vs_paddle": sample_logits_diff(fp32, ort, sentences), **accuracy(ort, sentences)}
        rows.append(speed_row(ort, row, sentences, opts))
    if "paddle" in opts["backends"] and int8_unavailable(static_dir):
        progress(f"{name}: {int8_unavailable(static_dir)}")
    elif "paddle" in opts["backends"]:
        progress(f"{name}: INT8 quantization")
        int8_dir = quantize_int8(static_dir, os.path.join(work_dir, f"{slug(name)}-int8"),
                                 calibration(fp32, opts["calibration_sentences"], opts["batch_size"]))
        int8 = StaticTagger(int8_dir, threads=opts["threads"], batch_size=opts["batch_size"], int8=True)
        rows.append(speed_row(int8, {**base, "precision_kind": "int8", "backend": "paddle",
                                     "disk_bytes": disk_bytes(int8_dir), **accuracy(int8, sentences)},
                              sentences, opts))
    for row in rows:
        row["sentences_differing_from_paddle"] = tags_differ(row.pop("tags"), reference["tags"])
    return rows


def speed_row(tagger, row, sentences, opts):
    """``row`` plus batch-1 latency (a batch-1 copy of ``tagger``'s predictor) and batch throughput."""
    batch_size, tagger.batch_size = tagger.batch_size, 1
    row.update(latency_ms(tagger, sentences[: opts["latency_sentences"]]))
    tagger.batch_size = batch_size
    row.update(throughput(tagger, sentences[: opts["speed_sentences"]], batch_size, opts["repeats"]))
    return row


def calibration(tagger, sentences, batch_size):
    return [{"input_ids": b["input_ids"], "token_type_ids": b["token_type_ids"]}
            for b in fixed_batches(tagger, sentences, batch_size)]


def slug(name):
    return name.replace(" ", "_")


def export_dir_width(name):
    """1.0 for "teacher" and "student", W for "width W" and "student width W"."""
    last = name.split()[-1]
    return float(last) if last[0].isdigit() else 1.0


def summary_row(name, export_dir, sentences, threads=None, device="cpu", latency_sentences=300,
                backend=DEFAULT_BACKEND):
    """The short figures ``run_pipeline.py`` prints: the default backend (Paddle Inference on GPU),
    accuracy and batch-1 latency over real test sentences."""
    backend = "paddle" if device != "cpu" else backend
    tagger = load_tagger(os.path.join(export_dir, "static"), backend, device, threads)
    row = {"model": name, "width_mult": export_dir_width(name), "parameters": parameters(export_dir),
           "backend": backend}
    row.update(accuracy(tagger, sentences))
    row.pop("tags")
    tagger.batch_size = 1
    row.update(latency_ms(tagger, sentences[:latency_sentences]))
    return row


