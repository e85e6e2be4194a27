"""Accuracy, size and speed of the teacher and every exported width, measured side by side.

Backends: Paddle Inference FP32 (oneDNN), Paddle Inference INT8 (post-training quantization),
ONNX Runtime (paddle2onnx), and the dynamic graph for comparison. Every timing excludes
warm-up and is the median of repeated runs on the same sentences in the same process.
"""
import json
import os
import platform
import statistics
import time

import numpy as np
import paddle

from .artifacts import read_manifest
from .data import collate
from .backends import DynamicTagger, OnnxTagger, StaticTagger, export_onnx
from .inference import MODEL_PREFIX
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


def quantize_int8(static_dir, out_dir, calibration_feeds):
    """Post-training INT8 quantization of a static model (matmul weights and activations)."""
    from paddle.static.quantization import PostTrainingQuantization

    paddle.enable_static()
    try:
        ptq = PostTrainingQuantization(
            executor=paddle.static.Executor(paddle.CPUPlace()), model_dir=static_dir,
            model_filename=MODEL_PREFIX + ".pdmodel", params_filename=MODEL_PREFIX + ".pdiparams",
            data_loader=CalibrationLoader(calibration_feeds), batch_nums=len(calibration_feeds),
            algo="hist", quantizable_op_type=["matmul_v2", "matmul", "mul"], onnx_format=True)
        ptq.quantize()
        ptq.save_quantized_model(out_dir, model_filename=MODEL_PREFIX + ".pdmodel",
                                 params_filename=MODEL_PREFIX + ".pdiparams")
    finally:
        paddle.disable_static()
    for name in ("vocab.txt", "inference.json"):
        with open(os.path.join(static_dir, name), "rb") as src, open(os.path.join(out_dir, name), "wb") as dst:
            dst.write(src.read())
    return out_dir


# --- measurements ------------------------------------------------------------------------------

def accuracy(tagger, sentences):
    start = time.perf_counter()
    pred = tagger.tag_sentences(sentences)
    seconds = time.perf_counter() - start
    return {**entity_scores([s.tags for s in sentences], pred), "test_seconds": seconds}


def latency_ms(tagger, sentences, warmup=5):
    """p50 and p95 milliseconds per sentence at batch 1."""
    timings = []
    for i, sentence in enumerate(sentences):
        start = time.perf_counter()
        tagger.tag_sentences([sentence])
        if i >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    return {"latency_ms_p50": statistics.median(timings),
            "latency_ms_p95": timings[min(len(timings) - 1, int(0.95 * len(timings)))]}


def fixed_batches(tagger, sentences, batch_size):
    windows = tagger.windows(sentences)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
    return [collate([windows[i] for i in order[j: j + batch_size]], tagger.encoder.pad_id)
            for j in range(0, len(order), batch_size)]


def throughput(tagger, sentences, batch_size=32, repeats=3):
    """Sentences/s and characters/s at ``batch_size``: median of ``repeats`` runs after one warm-up."""
    batches = fixed_batches(tagger, sentences, batch_size)
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
    return sum(os.path.getsize(os.path.join(static_dir, MODEL_PREFIX + ext)) for ext in (".pdmodel", ".pdiparams"))


def parameters(export_dir):
    return read_manifest(os.path.join(export_dir, "static"), "export").get("parameters")


# --- the run -----------------------------------------------------------------------------------

def measure_model(name, export_dir, sentences, work_dir, opts, progress):
    """Every figure of one exported model, FP32 and INT8, Paddle Inference, dynamic and ONNX Runtime."""
    static_dir = os.path.join(export_dir, "static")
    fp32 = StaticTagger(static_dir, threads=opts["threads"], batch_size=opts["batch_size"])
    speed_sentences = sentences[: opts["speed_sentences"]]
    shape = model_shape(export_dir)
    row = {"model": name, "precision_kind": "fp32", "width_mult": export_dir_width(name),
           "parameters": parameters(export_dir), "disk_bytes": disk_bytes(static_dir)}
    row.update(accuracy(fp32, sentences))
    row.update(latency_ms(fp32, sentences[: opts["latency_sentences"]]))
    row.update(throughput(fp32, speed_sentences, opts["batch_size"], opts["repeats"]))
    row["gflops_achieved"] = forward_flops(shape, fixed_batches(fp32, speed_sentences, opts["batch_size"])) \
        / row["batch_seconds"] / 1e9
    progress(f"{name}: dynamic graph")
    dynamic = throughput(DynamicTagger(export_dir, opts["batch_size"]), speed_sentences, opts["batch_size"],
                         opts["repeats"])
    row["dynamic_sentences_per_s"] = dynamic["sentences_per_s"]
    progress(f"{name}: ONNX Runtime")
    onnx_path = export_onnx(static_dir, os.path.join(work_dir, f"{slug(name)}.onnx"))
    ort = OnnxTagger(static_dir, onnx_path, opts["threads"], opts["batch_size"])
    onnx_row = {"model": name, "precision_kind": "onnxruntime-fp32", "width_mult": row["width_mult"],
                "parameters": row["parameters"], "disk_bytes": os.path.getsize(onnx_path),
                "max_abs_diff_vs_paddle": sample_logits_diff(fp32, ort, sentences)}
    onnx_row.update(accuracy(ort, sentences))
    onnx_row.update(throughput(ort, speed_sentences, opts["batch_size"], opts["repeats"]))
    progress(f"{name}: INT8 quantization")
    int8_dir = quantize_int8(static_dir, os.path.join(work_dir, f"{slug(name)}-int8"),
                             calibration(fp32, opts["calibration_sentences"], opts["batch_size"]))
    int8 = StaticTagger(int8_dir, threads=opts["threads"], batch_size=opts["batch_size"], int8=True)
    int8_row = {"model": name, "precision_kind": "int8", "width_mult": row["width_mult"],
                "parameters": row["parameters"], "disk_bytes": disk_bytes(int8_dir)}
    int8_row.update(accuracy(int8, sentences))
    int8_row.update(latency_ms(int8, sentences[: opts["latency_sentences"]]))
    int8_row.update(throughput(int8, speed_sentences, opts["batch_size"], opts["repeats"]))
    return [row, onnx_row, int8_row]


def calibration(tagger, sentences, batch_size):
    return [{"input_ids": b["input_ids"], "token_type_ids": b["token_type_ids"]}
            for b in fixed_batches(tagger, sentences, batch_size)]


def slug(name):
    return name.replace(" ", "_")


def export_dir_width(name):
    """1.0 for "teacher" and "student", W for "width W" and "student width W"."""
    last = name.split()[-1]
    return float(last) if last[0].isdigit() else 1.0


def find(rows, model, kind):
    return next((r for r in rows if r["model"] == model and r["precision_kind"] == kind), None)


def targets(rows):
    """The issue's targets, each met or missed (None when the needed rows are absent)."""
    teacher, half = find(rows, "teacher", "fp32"), find(rows, "width 0.5", "fp32")
    half_int8 = find(rows, "width 0.5", "int8")
    checks = []
    if teacher and half:
        ratio = half["sentences_per_s"] / teacher["sentences_per_s"]
        share = half["f1"] / teacher["f1"] if teacher["f1"] else 0.0
        checks.append(("width 0.5 FP32: >= 2.5x teacher static throughput at batch 32", f"{ratio:.2f}x", ratio >= 2.5))
        checks.append(("width 0.5 FP32: >= 99% of teacher F1", f"{share:.2%}", share >= 0.99))
    if teacher and half_int8 and half:
        ratio = half_int8["sentences_per_s"] / teacher["sentences_per_s"]
        gap = abs(half["f1"] - half_int8["f1"]) * 100
        checks.append(("width 0.5 INT8: >= 4x FP32 teacher throughput", f"{ratio:.2f}x", ratio >= 4))
        checks.append(("width 0.5 INT8: F1 within 1 point of FP32 width 0.5", f"{gap:.2f} points", gap <= 1))
    if teacher:
        ratio = teacher["sentences_per_s"] / teacher["dynamic_sentences_per_s"]
        checks.append(("static predictor: >= 3x dynamic throughput at batch 32 (teacher)", f"{ratio:.2f}x",
                       ratio >= 3))
    return [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in checks]


def student_targets(rows):
    """Issue 9's targets for the half-depth student and its width 0.5 (FP32, vs the FP32 teacher)."""
    teacher = find(rows, "teacher", "fp32")
    checks = []
    for model, speed, latency, share in (("student", 1.8, 1.6, 0.98), ("student width 0.5", 3.0, 2.0, 0.97)):
        row = find(rows, model, "fp32")
        if not (teacher and row):
            continue
        ratios = (row["sentences_per_s"] / teacher["sentences_per_s"],
                  teacher["latency_ms_p50"] / row["latency_ms_p50"], row["f1"] / teacher["f1"] if teacher["f1"] else 0)
        checks.append((f"{model} FP32: >= {speed}x teacher throughput at batch 32", f"{ratios[0]:.2f}x",
                       ratios[0] >= speed))
        checks.append((f"{model} FP32: >= {latency}x lower batch-1 p50", f"{ratios[1]:.2f}x", ratios[1] >= latency))
        checks.append((f"{model} FP32: >= {share:.0%} of teacher F1", f"{ratios[2]:.2%}", ratios[2] >= share))
    return [{"target": t, "measured": m, "met": bool(ok)} for t, m, ok in checks]


def markdown(results):
    rows, teacher = results["rows"], find(results["rows"], "teacher", "fp32")
    base_f1 = teacher["f1"] if teacher else None
    base_speed = teacher["sentences_per_s"] if teacher else None
    lines = [
        "# ner_compress benchmark", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['threads']} threads; float32 matmul ceiling {results['matmul_gflops']:.1f} GFLOP/s  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["machine"]["versions"].items()) + "  ",
        f"Test sentences: {results['test_sentences']} (speed on the first {results['speed_sentences']}, batch "
        f"{results['batch_size']}, median of {results['repeats']} runs after a warm-up)", "",
        "| model | backend | params | MB on disk | P | R | F1 | F1 / teacher | PER | LOC | ORG | p50 ms (b=1) | "
        "p95 ms | sent/s (b=32) | char/s | x teacher | dynamic sent/s | GFLOP/s | test set s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per = r.get("per_type", {})
        cell = lambda key, fmt: fmt.format(r[key]) if r.get(key) is not None else "-"  # noqa: E731
        lines.append(" | ".join([
            f"| {r['model']}", r["precision_kind"], f"{r['parameters']:,}" if r.get("parameters") else "-",
            f"{r['disk_bytes'] / 1e6:.1f}", f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
            f"{r['f1'] / base_f1:.2%}" if base_f1 else "-",
            *[f"{per[t]['f1']:.3f}" if t in per else "-" for t in ("PER", "LOC", "ORG")],
            cell("latency_ms_p50", "{:.2f}"), cell("latency_ms_p95", "{:.2f}"), f"{r['sentences_per_s']:.0f}",
            f"{r['chars_per_s']:.0f}", f"{r['sentences_per_s'] / base_speed:.2f}x" if base_speed else "-",
            cell("dynamic_sentences_per_s", "{:.0f}"), cell("gflops_achieved", "{:.1f}"),
            f"{r['test_seconds']:.1f} |"]))
    lines += ["", "## Targets", ""]
    lines += [f"- {t['target']}: {t['measured']} — **{'met' if t['met'] else 'missed'}**" for t in results["targets"]]
    onnx = [r for r in rows if r["precision_kind"] == "onnxruntime-fp32"]
    if onnx:
        lines += ["", "ONNX Runtime vs Paddle Inference, max abs logit difference: " + ", ".join(
            f"{r['model']} {r['max_abs_diff_vs_paddle']:.1e}" for r in onnx)]
    lines += ["", "![F1 against throughput](pareto.png)", ""]
    return "\n".join(lines)


def summary_row(name, export_dir, sentences, threads=None, device="cpu", latency_sentences=110):
    """The short figures ``run_pipeline.py`` prints: FP32 Paddle Inference only."""
    static_dir = os.path.join(export_dir, "static")
    tagger = StaticTagger(static_dir, device=device, threads=threads)
    row = {"model": name, "width_mult": export_dir_width(name), "parameters": parameters(export_dir)}
    row.update(accuracy(tagger, sentences))
    row.update(latency_ms(tagger, sentences[:latency_sentences], warmup=10))
    return row


def summary_table(rows):
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


def plot_pareto(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp32": "o", "int8": "s", "onnxruntime-fp32": "^"}
    for kind, marker in markers.items():
        points = [r for r in rows if r["precision_kind"] == kind]
        ax.scatter([r["sentences_per_s"] for r in points], [r["f1"] for r in points], marker=marker, label=kind)
        for r in points:
            ax.annotate(r["model"], (r["sentences_per_s"], r["f1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    teacher = find(rows, "teacher", "fp32")
    if teacher:
        ax.scatter([teacher["sentences_per_s"]], [teacher["f1"]], s=160, facecolors="none", edgecolors="red",
                   label="teacher (FP32)")
    ax.set_xlabel("throughput at batch 32 (sentences/s, higher is better)")
    ax.set_ylabel("test entity F1")
    ax.set_title("F1 against throughput: up and to the right is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
