"""Accuracy, size and speed of the teacher and every exported width, measured side by side.

Each model x backend x precision is measured in a process of its own: Paddle Inference FP32 (with
the dynamic graph beside it) and INT8 (post-training quantization, oneDNN); ONNX Runtime on
paddle2onnx's ``model.onnx`` as exported ("unfused"), on the fused ``model.opt.onnx`` (FP32) and on
the INT8 copy ``model.int8.onnx``. Batch-1 latency is per real test sentence in the test set's
order and lengths (p50/p95/p99 after a warm-up, ``timing``'s percentile); batch throughput is the
median of repeated runs over length-sorted and unsorted batches. ``report`` renders the figures.
"""
import json
import multiprocessing
import os
import platform
import shutil
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import paddle

from ner_compress.core import console, runtime
from ner_compress.measure import timing
from ner_compress.models.families import load_config
from ner_compress.data.vocab import copy_vocab
from ner_compress.core.artifacts import MANIFEST, read_manifest
from ner_compress.core.options import flag_field
from ner_compress.deploy.backends import (BACKENDS, FUSED_FILE, INT8_FILE, ONNX_DIR, ONNX_FILE, DynamicTagger,
                                          OnnxTagger, StaticTagger, default_backend, load_tagger, onnx_path_for)
from ner_compress.deploy.inference import Tagger
from ner_compress.core.static_files import PIR_PROGRAM, static_model_files
from ner_compress.data.entity_scores import entity_scores
from ner_compress.models.width_plan import plan_of
from ner_compress.deploy.parity import max_abs_diff


@dataclass
class BenchmarkOptions:
    """What ``tools/benchmark.py`` measures and how (``config.add_dataclass_flags``)."""
    threads: Optional[int] = flag_field(None, "CPU threads (default: all cores)")
    batch_size: int = flag_field(32, "sentences per batch for throughput")
    repeats: int = flag_field(5, "timed runs per figure (median)")
    speed_sentences: int = flag_field(1000, "test sentences timed per run")
    latency_sentences: int = flag_field(200, "sentences timed at batch 1")
    backend: Optional[str] = flag_field(None, "paddle (FP32 and INT8 Paddle Inference) or onnxruntime (model.onnx, "
                                        "fused model.opt.onnx, INT8 model.int8.onnx); default: both")
    export_missing: bool = flag_field(False, "export teacher/widths not yet exported")
    models: Optional[List[str]] = flag_field(
        None, 'only these models, named as in the table ("teacher", "width 0.5", "student"); default: every '
        "exported one", nargs="+", metavar="NAME")
    # Paddle INT8 calibrates on training sentences, so dev and test stay what it is judged on
    calibration_sentences: int = flag_field(320, "training sentences that calibrate Paddle INT8")
    calibration_seed: int = flag_field(0, "which training sentences")
    report_dir: Optional[str] = flag_field(
        None, "where results.json, report.md and pareto.png go (default: DIR/report); with --test_file, e.g. "
        "DIR/report/ood keeps the in-domain report")

    @property
    def backends(self):
        return [self.backend] if self.backend else list(BACKENDS)


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
    copy_vocab(os.path.join(static_dir, "vocab.txt"), out_dir)  # with the lookup rule, if the model has one
    shutil.copyfile(os.path.join(static_dir, "inference.json"), os.path.join(out_dir, "inference.json"))
    return out_dir


# --- measurements ------------------------------------------------------------------------------

def accuracy(tagger, sentences):
    """Entity scores on ``sentences``; ``tags`` (the predictions) is dropped from saved rows."""
    start = time.perf_counter()
    pred = tagger.tag_sentences(sentences)
    seconds = time.perf_counter() - start
    return {**entity_scores([s.tags for s in sentences], pred), "test_seconds": seconds, "tags": pred}


def latency_ms(tagger, sentences, warmup=10):
    """p50/p95/p99 milliseconds per sentence at batch 1, text to tags, in the sentences' own order."""
    calls = [lambda s=sentence: tagger.tag_sentences([s]) for sentence in sentences[:warmup] + sentences]
    timings = timing.call_ms(calls, warmup=min(warmup, len(sentences)))
    return {**timing.latency_summary(timings), "latency_sentences": len(timings)}


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
        for b in batches:
            tagger.logits(b["input_ids"], b["token_type_ids"])

    seconds = timing.median_seconds(run_once, repeats)
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
    """Layer sizes of the exported model as built: each layer's heads, q/k/v width and FFN neurons from the
    ``WidthPlan`` its config records (the plan the model itself was cut by)."""
    config = load_config(os.path.join(export_dir, "dynamic"), "export")
    plan = plan_of(config, os.path.join(export_dir, "dynamic", "config.json"))
    def summary(counts):  # the table's figure: one count, or each layer's
        return counts[0] if plan.uniform else list(counts)

    return {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "heads": summary(plan.layer_heads),
            "ffn": summary(plan.layer_neurons), "layer_attn_inner": plan.attention_widths(),
            "layer_ffn": list(plan.layer_neurons), "labels": config.num_labels}


def forward_flops(shape, batches):
    """Multiply-adds x2 of one forward over padded batches: projections, attention, FFN (each layer its own
    widths), classifier."""
    total = 0
    for b in batches:
        n, t = b["input_ids"].shape
        for attn_inner, ffn in zip(shape["layer_attn_inner"], shape["layer_ffn"]):
            total += 2 * n * t * shape["hidden"] * (4 * attn_inner + 2 * ffn) + 4 * n * t * t * attn_inner
        total += 2 * n * t * shape["hidden"] * shape["labels"]
    return total


def matmul_gflops(threads=None, size=1024, repeats=10):
    """The machine's float32 matrix-multiply ceiling (numpy BLAS), median of repeats."""
    from threadpoolctl import threadpool_limits

    a = np.random.rand(size, size).astype("float32")
    b = np.random.rand(size, size).astype("float32")
    with threadpool_limits(limits=threads or os.cpu_count()):
        seconds = timing.median_seconds(lambda: a @ b, repeats)
    return 2 * size ** 3 / seconds / 1e9


def machine_info():
    cpu = runtime.cpuinfo_field("model name", platform.processor())
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


def how_made(export_dir):
    """How the exported model was made, from the manifest of the stage it came from: "cut + 60 OFA steps +
    refit", "teacher layers + refit" (step 0: training never beat the start)."""
    source = next(iter(read_manifest(os.path.join(export_dir, "static"), "export")["inputs"].values()))
    step = source.get("metrics", {}).get("step", 0)
    start, steps = {"teacher": ("fine-tuned", "steps"), "ofa": ("cut", "OFA steps"),
                    "student": ("teacher layers" if source.get("init_teacher_layers") else "random init",
                                "distillation steps")}[source["stage"]]
    if source.get("start_reconstruction"):
        start += " refit"
    parts = [start] + ([f"{step} {steps}"] if step else [])
    if source.get("reconstruction", {}).get("kept"):
        parts.append("refit")
    return " + ".join(parts)


# --- one fresh process per model x backend x precision ---------------------------------------

# precision_kind -> the file ONNX Runtime runs: paddle2onnx's graph as exported, the fused graph (the
# FP32 that is deployed; model.onnx when the export wrote no fused graph) and the INT8 copy
ORT_GRAPHS = {"onnxruntime-unfused": ONNX_FILE, "onnxruntime-fp32": FUSED_FILE, "onnxruntime-int8": INT8_FILE}
FUSION_OPS = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu")


def variants(export_dir, backends):
    """The (backend, precision_kind) pairs one export has files for, in the order they are measured."""
    onnx_dir = os.path.join(export_dir, ONNX_DIR)
    found = [("paddle", "fp32")] if "paddle" in backends else []
    found += [("paddle", "int8")] * ("paddle" in backends and not int8_unavailable(os.path.join(export_dir, "static")))
    if "onnxruntime" in backends:
        fused = os.path.isfile(os.path.join(onnx_dir, FUSED_FILE))
        found += [("onnxruntime", "onnxruntime-unfused")] * fused + [("onnxruntime", "onnxruntime-fp32")]
        found += [("onnxruntime", "onnxruntime-int8")] * os.path.isfile(os.path.join(onnx_dir, INT8_FILE))
    return found


def onnx_manifest(export_dir):
    """The export's ``onnx`` manifest entry (fusion, int8), {} for an export without one."""
    path = os.path.join(export_dir, ONNX_DIR, MANIFEST)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh).get("onnx") or {}


def fusion_counts(export_dir, graph_file):
    """Fused op counts of the graph ONNX Runtime runs (the INT8 copy inherits its source's); None unfused."""
    meta = onnx_manifest(export_dir)
    source = (meta.get("int8") or {}).get("source") if graph_file == INT8_FILE else graph_file
    fused = (meta.get("fusion") or {}).get("fused")
    if source != FUSED_FILE or not fused:
        return None
    return {op: fused.get(op, 0) for op in FUSION_OPS}


def int8_configuration(export_dir):
    """What the export's INT8 copy is, as its manifest records it: "dynamic, whole graph", "static, 4 nodes
    kept in FP32 (layer 5)"; None when the manifest does not say (an export from before the search)."""
    int8 = onnx_manifest(export_dir).get("int8") or {}
    return f"{int8['method']}, {int8['configuration']}" if int8.get("configuration") else None


def tagger_for(kind, export_dir, work_dir, opts, calibration_sentences):
    """The tagger of one precision_kind and the row's file figures (bytes on disk, ONNX graph, fusions);
    Paddle INT8 is calibrated on ``calibration_sentences``."""
    static_dir = os.path.join(export_dir, "static")
    if kind == "fp32":
        return (StaticTagger(static_dir, threads=opts.threads, batch_size=opts.batch_size),
                {"disk_bytes": disk_bytes(static_dir)})
    if kind == "int8":
        feeds = calibration(Tagger(static_dir, opts.batch_size), calibration_sentences, opts.batch_size)
        int8_dir = quantize_int8(static_dir, os.path.join(work_dir, f"{os.path.basename(export_dir)}-int8"), feeds)
        return (StaticTagger(int8_dir, threads=opts.threads, batch_size=opts.batch_size, int8=True),
                {"disk_bytes": disk_bytes(int8_dir)})
    path = onnx_path_for(static_dir, "int8" if kind == "onnxruntime-int8" else "fp32")
    if kind == "onnxruntime-unfused":
        path = os.path.join(os.path.dirname(path), ONNX_FILE)
    tagger = OnnxTagger(static_dir, path, threads=opts.threads, batch_size=opts.batch_size)
    files = {"disk_bytes": os.path.getsize(path), "graph": os.path.basename(path),
             "fusion": fusion_counts(export_dir, os.path.basename(path))}
    if kind == "onnxruntime-int8":
        files["int8_configuration"] = int8_configuration(export_dir)
    return tagger, files


def measure_variant(job):
    """Every figure of one (model, backend, precision_kind): accuracy with its tags, batch-1 latency,
    batch throughput; Paddle FP32 adds the dynamic graph and the FLOP rate, ONNX Runtime FP32 its
    logit difference from Paddle Inference (measured after the timings)."""
    console.quiet_libraries()  # a fresh process: the tool's logger levels are not inherited
    ref, export_dir, kind, opts = job["model"], job["export_dir"], job["kind"], job["opts"]
    sentences, shape = job["sentences"], model_shape(export_dir)
    tagger, files = tagger_for(kind, export_dir, job["work_dir"], opts, job["calibration_sentences"])
    row = {**model_fields(ref), "parameters": parameters(export_dir), "layers": shape["layers"],
           "heads": shape["heads"], "ffn_neurons": shape["ffn"], "backend": job["backend"], "precision_kind": kind,
           "pid": os.getpid(),
           "dtype": "int8" if kind.endswith("int8") else "fp32", **files, **accuracy(tagger, sentences)}
    speed_row(tagger, row, sentences, opts)
    speed = sentences[: opts.speed_sentences]
    if kind == "fp32":
        row["gflops_achieved"] = forward_flops(shape, fixed_batches(tagger, speed, opts.batch_size)) \
            / row["batch_seconds"] / 1e9
        row["dynamic_sentences_per_s"] = throughput(DynamicTagger(export_dir, opts.batch_size), speed,
                                                    opts.batch_size, opts.repeats)["sentences_per_s"]
    if kind in ("onnxruntime-unfused", "onnxruntime-fp32"):
        paddle = StaticTagger(os.path.join(export_dir, "static"), threads=opts.threads)
        row["max_abs_diff_vs_paddle"] = sample_logits_diff(paddle, tagger, sentences)
    return row


def measure_in_fresh_processes(models, sentences, calibration_sentences, work_dir, opts, progress):
    """``measure_variant`` of every model x backend x precision, each in a process of its own, one at a
    time (so that no row runs after another's predictor threads and caches). The processes are forked
    from a server that has only imported this module: a fresh process without the import each time."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [{"model": ref, "export_dir": directory, "backend": backend, "kind": kind, "sentences": sentences,
             "calibration_sentences": calibration_sentences, "work_dir": work_dir, "opts": opts}
            for ref, directory in models for backend, kind in variants(directory, opts.backends)]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # __main__: else each child re-imports it
    rows = []
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        for job, row in zip(jobs, pool.map(measure_variant, jobs)):
            progress(f"{job['model'].name}: {job['kind']} measured")
            rows.append(row)
    return compare_tags(rows)


def compare_tags(rows):
    """``sentences_differing_from_paddle``: each row's tags against its model's Paddle Inference FP32
    tags (left out when Paddle was not measured); the tags themselves are dropped."""
    reference = {r["model"]: r["tags"] for r in rows if r["precision_kind"] == "fp32"}
    for row in rows:
        tags = row.pop("tags")
        if row["model"] in reference:
            row["sentences_differing_from_paddle"] = tags_differ(tags, reference[row["model"]])
    return rows


def speed_row(tagger, row, sentences, opts):
    """``row`` plus batch-1 latency (a batch-1 copy of ``tagger``'s predictor) and batch throughput."""
    batch_size, tagger.batch_size = tagger.batch_size, 1
    row.update(latency_ms(tagger, sentences[: opts.latency_sentences]))
    tagger.batch_size = batch_size
    row.update(throughput(tagger, sentences[: opts.speed_sentences], batch_size, opts.repeats))
    return row


def calibration(tagger, sentences, batch_size):
    return [{"input_ids": b["input_ids"], "token_type_ids": b["token_type_ids"]}
            for b in fixed_batches(tagger, sentences, batch_size)]


def model_fields(ref):
    """What a row says of its model: the table name, its source and width."""
    return {"model": ref.name, "source": ref.source, "width_mult": ref.width_mult}


def summary_row(ref, export_dir, sentences, threads=None, device="cpu", latency_sentences=300,
                backend=None):
    """The short figures ``run_pipeline.py`` prints: ``backend`` (default: ``backends.default_backend``),
    accuracy and batch-1 latency over real test sentences."""
    backend = backend or default_backend(device)
    tagger = load_tagger(os.path.join(export_dir, "static"), backend, device, threads)
    row = {**model_fields(ref), "parameters": parameters(export_dir), "made": how_made(export_dir),
           "backend": backend}
    row.update(accuracy(tagger, sentences))
    row.pop("tags")
    tagger.batch_size = 1
    row.update(latency_ms(tagger, sentences[:latency_sentences]))
    return row


