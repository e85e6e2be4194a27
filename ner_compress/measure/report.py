"""The benchmark's figures as targets, Markdown tables and a Pareto plot (``benchmark`` measures them), and the
one way a report is written: JSON and Markdown files, the Markdown on the console."""
import os

from ner_compress.compress.vocab_pruning import summary as pruning_summary
from ner_compress.core.artifacts import write_json
from ner_compress.core.layout import ModelRef
from ner_compress.deploy.backends import DEFAULT_BACKEND
from ner_compress.measure.benchmark import FUSION_OPS
from ner_compress.measure.targets import target, target_lines

TEACHER, HALF = ModelRef("teacher").name, ModelRef("teacher", 0.5).name  # the models the targets name
STUDENT, STUDENT_HALF = ModelRef("student").name, ModelRef("student", 0.5).name

KIND = {"paddle": "fp32", "onnxruntime": "onnxruntime-fp32"}  # each backend's FP32 (ONNX Runtime: fused graph)
KINDS = {"paddle": ("fp32", "int8"), "onnxruntime": ("onnxruntime-unfused", "onnxruntime-fp32", "onnxruntime-int8")}
MARKERS = {"fp32": "o", "int8": "s", "onnxruntime-unfused": "v", "onnxruntime-fp32": "^", "onnxruntime-int8": "D"}


def backend_of(kind):
    return next(b for b, kinds in KINDS.items() if kind in kinds)


def own_fp32(rows, row):
    """The FP32 row a row is compared with: its own model's (``model``) or the teacher's, same backend."""
    return {m: find_row(rows, m, KIND[backend_of(row["precision_kind"])]) for m in (row["model"], TEACHER)}


def annotate(rows):
    """Each row's F1 share of the FP32 teacher on the same backend, its speed-ups over that teacher
    (batch 32, batch-1 p50), and for INT8 the F1 points lost against the same model's FP32."""
    for row in rows:
        fp32 = own_fp32(rows, row)
        teacher, same = fp32[TEACHER], fp32[row["model"]]
        if teacher:
            row["f1_share_of_teacher"] = row["f1"] / teacher["f1"] if teacher["f1"] else None
            row["speedup_b32"] = row["sentences_per_s"] / teacher["sentences_per_s"]
            row["speedup_b1_p50"] = teacher["latency_ms_p50"] / row["latency_ms_p50"]
        if row["precision_kind"].endswith("int8") and same:
            row["int8_f1_drop_points"] = (same["f1"] - row["f1"]) * 100
    return rows


def find_row(rows, model, kind):
    return next((r for r in rows if r["model"] == model and r["precision_kind"] == kind), None)


def add_target(checks, what, measured, met):
    checks.append(target(what, measured, met))


def targets(rows, backend=DEFAULT_BACKEND):
    """The issues' targets, each met or missed; a target whose rows were not measured is left out.
    Latency and throughput ratios are on ``backend`` (falling back to whichever was measured)."""
    if not find_row(rows, TEACHER, KIND[backend]):
        backend = next((b for b, kind in KIND.items() if find_row(rows, TEACHER, kind)), backend)
    teacher, half = find_row(rows, TEACHER, KIND[backend]), find_row(rows, HALF, KIND[backend])
    paddle_teacher, paddle_half = find_row(rows, TEACHER, "fp32"), find_row(rows, HALF, "fp32")
    half_int8, checks = find_row(rows, HALF, "int8"), []
    if teacher and half:
        ratio = teacher["latency_ms_p50"] / half["latency_ms_p50"]
        add_target(checks, f"{HALF} {backend}: batch-1 p50 >= 1.7x lower than the teacher's", f"{ratio:.2f}x",
              ratio >= 1.7)
        ratio = half["sentences_per_s"] / teacher["sentences_per_s"]
        add_target(checks, f"{HALF} {backend}: batch-32 throughput >= 1.8x the teacher's", f"{ratio:.2f}x",
              ratio >= 1.8)
    for model in (TEACHER, HALF):
        paddle, ort = find_row(rows, model, "fp32"), find_row(rows, model, "onnxruntime-fp32")
        if paddle and ort:
            ratio = paddle["latency_ms_p50"] / ort["latency_ms_p50"]
            add_target(checks, f"{model} Paddle Inference: batch-1 p50 within 2x of ONNX Runtime's", f"{ratio:.2f}x",
                  ratio <= 2)
    differing = [(r["model"], r["precision_kind"]) for r in rows
                 if not r["precision_kind"].endswith("int8") and r.get("sentences_differing_from_paddle")]
    add_target(checks, "every FP32 backend: tags equal Paddle Inference's on the whole test set",
          "all equal" if not differing else f"differ: {differing}", not differing)
    if paddle_teacher and paddle_half:
        ratio = paddle_half["sentences_per_s"] / paddle_teacher["sentences_per_s"]
        share = paddle_half["f1"] / paddle_teacher["f1"] if paddle_teacher["f1"] else 0.0
        add_target(checks, f"{HALF} FP32: >= 2.5x teacher static throughput at batch 32", f"{ratio:.2f}x", ratio >= 2.5)
        add_target(checks, f"{HALF} FP32: >= 99% of teacher F1", f"{share:.2%}", share >= 0.99)
    if paddle_teacher and half_int8 and paddle_half:
        ratio = half_int8["sentences_per_s"] / paddle_teacher["sentences_per_s"]
        gap = abs(paddle_half["f1"] - half_int8["f1"]) * 100
        add_target(checks, f"{HALF} INT8: >= 4x FP32 teacher throughput", f"{ratio:.2f}x", ratio >= 4)
        add_target(checks, f"{HALF} INT8: F1 within 1 point of FP32 {HALF}", f"{gap:.2f} points", gap <= 1)
    if paddle_teacher:
        ratio = paddle_teacher["sentences_per_s"] / paddle_teacher["dynamic_sentences_per_s"]
        add_target(checks, "static predictor: >= 3x dynamic throughput at batch 32 (teacher)", f"{ratio:.2f}x",
              ratio >= 3)
    return checks


def student_targets(rows, backend=DEFAULT_BACKEND):
    """Issue 9's targets for the half-depth student and its width 0.5, against the teacher on ``backend``."""
    kind = KIND[backend] if find_row(rows, TEACHER, KIND[backend]) else "fp32"
    teacher, checks = find_row(rows, TEACHER, kind), []
    for model, speed, latency, share in ((STUDENT, 1.8, 1.6, 0.98), (STUDENT_HALF, 3.0, 2.0, 0.97)):
        row = find_row(rows, model, kind)
        if not (teacher and row):
            continue
        ratio = row["sentences_per_s"] / teacher["sentences_per_s"]
        add_target(checks, f"{model} {kind}: >= {speed}x teacher throughput at batch 32", f"{ratio:.2f}x",
                   ratio >= speed)
        ratio = teacher["latency_ms_p50"] / row["latency_ms_p50"]
        add_target(checks, f"{model} {kind}: >= {latency}x lower batch-1 p50", f"{ratio:.2f}x", ratio >= latency)
        ratio = row["f1"] / teacher["f1"] if teacher["f1"] else 0.0
        add_target(checks, f"{model} {kind}: >= {share:.0%} of teacher F1", f"{ratio:.2%}", ratio >= share)
    return checks


def smallest_within(rows, share=0.95, backend=DEFAULT_BACKEND):
    """The model with the fewest parameters that keeps ``share`` of the teacher's F1 on ``backend``,
    as one check with its size and speed-ups (issue 9's chart summary); [] without a teacher row."""
    kind = KIND[backend] if find_row(rows, TEACHER, KIND[backend]) else "fp32"
    teacher = find_row(rows, TEACHER, kind)
    if not teacher or not teacher["f1"]:
        return []
    keep = [r for r in rows if r["precision_kind"] == kind and r["model"] != TEACHER
            and r.get("parameters") and r["f1"] >= share * teacher["f1"]]
    checks = []
    if not keep:
        add_target(checks, f"smallest model keeping >= {share:.0%} of teacher F1 ({kind})", "none", False)
        return checks
    best = min(keep, key=lambda r: (r["parameters"], -r["sentences_per_s"]))
    add_target(checks, f"smallest model keeping >= {share:.0%} of teacher F1 ({kind})",
          f"{best['model']}: {best['parameters']:,} parameters ({teacher['parameters'] / best['parameters']:.2f}x "
          f"fewer), F1 {best['f1'] / teacher['f1']:.2%}, batch-32 "
          f"{best['sentences_per_s'] / teacher['sentences_per_s']:.2f}x, batch-1 p50 "
          f"{teacher['latency_ms_p50'] / best['latency_ms_p50']:.2f}x", True)
    return checks


def best_within(rows, share=0.97, backend=DEFAULT_BACKEND, speed=5.0):
    """The fastest row at batch 32 on ``backend`` (any width, depth, precision) keeping ``share`` of the
    FP32 teacher's F1, as one check against ``speed`` x that teacher's throughput; [] without a teacher."""
    if not find_row(rows, TEACHER, KIND[backend]):
        backend = next((b for b in KIND if find_row(rows, TEACHER, KIND[b])), backend)
    teacher = find_row(rows, TEACHER, KIND[backend])
    if not teacher or not teacher["f1"]:
        return []
    keep = [r for r in rows if r["precision_kind"] in KINDS[backend] and r["f1"] >= share * teacher["f1"]]
    best = max(keep, key=lambda r: r["sentences_per_s"])  # the teacher itself is always in keep
    ratio = best["sentences_per_s"] / teacher["sentences_per_s"]
    checks = []
    add_target(checks, f"best model within {share:.0%} of the FP32 teacher's F1 on {backend} (width x depth x "
          f"precision): >= {speed:g}x its batch-32 throughput",
          f"{best['model']} {best['precision_kind']}: F1 {best['f1'] / teacher['f1']:.2%}, batch-32 {ratio:.2f}x "
          f"({best['sentences_per_s']:.0f} sent/s), batch-1 p50 {best['latency_ms_p50']:.2f} ms", ratio >= speed)
    return checks


def deployment_targets(rows):
    """Issue 20's: the teacher's fused graph has every fusion and runs >= 1.1x the unfused one; each
    ONNX Runtime INT8 >= 1.5x its model's fused FP32 at batch 32 and batch 1 within 1 F1 point; the best
    model within 97% of the teacher's F1."""
    checks = []
    fused, unfused = find_row(rows, TEACHER, "onnxruntime-fp32"), find_row(rows, TEACHER, "onnxruntime-unfused")
    if fused and unfused:
        layers, counts = fused["layers"], fused["fusion"]
        want = {"Attention": layers, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 2 * layers,
                "BiasGelu": layers}
        add_target(checks, "teacher fused graph: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu "
              f"as in a standard BERT ({'/'.join(str(want[op]) for op in FUSION_OPS)})", fusion_text(counts),
              all(counts[op] >= n for op, n in want.items()))
        b32, b1 = (fused["sentences_per_s"] / unfused["sentences_per_s"],
                   unfused["latency_ms_p50"] / fused["latency_ms_p50"])
        add_target(checks, "teacher onnxruntime: fused graph >= 1.1x the unfused model.onnx at batch 32",
              f"{b32:.2f}x (batch-1 p50 {b1:.2f}x)", b32 >= 1.1)
    for row in (r for r in rows if r["precision_kind"] == "onnxruntime-int8"):
        fp32 = find_row(rows, row["model"], "onnxruntime-fp32")
        if fp32:
            b32, b1 = (row["sentences_per_s"] / fp32["sentences_per_s"],
                       fp32["latency_ms_p50"] / row["latency_ms_p50"])
            drop = (fp32["f1"] - row["f1"]) * 100
            add_target(checks, f"{row['model']} onnxruntime INT8: >= 1.5x its FP32 at batch 32 and batch 1, <= 1 F1 "
                  "point lost", f"{b32:.2f}x / {b1:.2f}x, {drop:.2f} points", min(b32, b1) >= 1.5 and drop <= 1)
    return checks + best_within(rows)


def all_targets(rows):
    """Every target the benchmark checks: the issues', the student's, the smallest model within reach, deployment."""
    return targets(rows) + student_targets(rows) + smallest_within(rows) + deployment_targets(rows)


def write_report(report_dir, results, text, json_name, markdown_name):
    """``results`` as JSON and ``text`` as Markdown under ``report_dir``, then ``text`` on the console (the
    benchmark's report and the pipeline's)."""
    os.makedirs(report_dir, exist_ok=True)
    write_json(os.path.join(report_dir, json_name), results)
    text = text.rstrip("\n")
    with open(os.path.join(report_dir, markdown_name), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    print(text)


def fusion_text(counts):
    return "/".join(str(counts[op]) for op in FUSION_OPS) if counts else "-"


def cell(row, key, fmt):
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def markdown(results):
    rows = annotate(results["rows"])
    lines = [
        "# ner_compress benchmark", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['threads']} threads; float32 matmul ceiling {results['matmul_gflops']:.1f} GFLOP/s  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["machine"]["versions"].items()) + "  ",
        f"Test sentences: {results['test_sentences']} ({results.get('test_source', 'MSRA test')}). Each model x "
        "backend x precision measured in a process of its own. Batch-1 latency: text to tags, one real test "
        f"sentence at a time in the test set's order (first {results['latency_sentences']}, after 10 warm-up calls). "
        f"Throughput: first {results['speed_sentences']} sentences, batch {results['batch_size']}, "
        f"median of {results['repeats']} runs after a warm-up, length-sorted and unsorted batches. "
        "F1 / teacher and x teacher: against the FP32 teacher on the same backend (ONNX Runtime: its fused "
        "graph); INT8 F1 lost: points against the same model's FP32 on the same backend. Fusions: "
        "fused Attention / EmbedLayerNormalization / SkipLayerNormalization / BiasGelu nodes (export manifest).", "",
        "| model | backend | params | heads / FFN | MB on disk | P | R | F1 | F1 / teacher | INT8 F1 lost | PER | LOC "
        "| ORG | p50 ms (b=1) | p95 ms | p99 ms | sent/s (b=32, sorted) | x teacher (b=32) | unsorted | char/s | "
        "dynamic sent/s | GFLOP/s | fusions | tags != paddle | test set s |",
        "|---|---|" + "---:|" * 23,
    ]
    for r in rows:
        per = r.get("per_type", {})
        lines.append(" | ".join([
            f"| {r['model']}", r["precision_kind"], f"{r['parameters']:,}" if r.get("parameters") else "-",
            f"{r['heads']} / {r['ffn_neurons']}" if r.get("heads") else "-",
            f"{r['disk_bytes'] / 1e6:.1f}", f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
            cell(r, "f1_share_of_teacher", "{:.2%}"), cell(r, "int8_f1_drop_points", "{:.2f}"),
            *[f"{per[t]['f1']:.3f}" if t in per else "-" for t in ("PER", "LOC", "ORG")],
            cell(r, "latency_ms_p50", "{:.2f}"), cell(r, "latency_ms_p95", "{:.2f}"),
            cell(r, "latency_ms_p99", "{:.2f}"), f"{r['sentences_per_s']:.0f}", cell(r, "speedup_b32", "{:.2f}x"),
            cell(r, "unsorted_sentences_per_s", "{:.0f}"), f"{r['chars_per_s']:.0f}",
            cell(r, "dynamic_sentences_per_s", "{:.0f}"), cell(r, "gflops_achieved", "{:.1f}"),
            fusion_text(r.get("fusion")), cell(r, "sentences_differing_from_paddle", "{}"),
            f"{r['test_seconds']:.1f} |"]))
    if results.get("vocab_pruning"):
        lines += ["", f"Teacher vocabulary pruning: {pruning_summary(results['vocab_pruning'])} "
                  "(the table's parameters are after pruning)."]
    lines += target_lines(results["targets"])
    lines += int8_lines(rows)
    onnx = [r for r in rows if "max_abs_diff_vs_paddle" in r]
    if onnx:
        lines += ["", "ONNX Runtime vs Paddle Inference, max abs logit difference: " + ", ".join(
            f"{r['model']} {r['precision_kind']} {r['max_abs_diff_vs_paddle']:.1e}" for r in onnx)]
    lines += ["", "![F1 against throughput](pareto.png)", ""]
    return "\n".join(lines)


def int8_lines(rows):
    """Per model, its ONNX Runtime INT8 copy beside its fused FP32 graph: the configuration the export chose
    (whole graph, or N nodes kept in FP32), test F1 and speed of both; [] without an INT8 row."""
    pairs = [(find_row(rows, r["model"], "onnxruntime-fp32"), r) for r in rows
             if r["precision_kind"] == "onnxruntime-int8"]
    pairs = [(fp32, int8) for fp32, int8 in pairs if fp32]
    if not pairs:
        return []
    lines = ["", "ONNX Runtime INT8 per model, beside its fused FP32 graph (configuration: as the export chose it "
             "on dev; F1 on test):", "",
             "| model | INT8 configuration | F1 FP32 | F1 INT8 | points lost | sent/s FP32 (b=32) | INT8 | x FP32 | "
             "p50 ms FP32 (b=1) | INT8 | x FP32 |",
             "|---|---|" + "---:|" * 9]
    for fp32, int8 in pairs:
        lines.append(f"| {int8['model']} | {int8.get('int8_configuration') or '-'} | {fp32['f1']:.4f} | "
                     f"{int8['f1']:.4f} | {(fp32['f1'] - int8['f1']) * 100:.2f} | {fp32['sentences_per_s']:.0f} | "
                     f"{int8['sentences_per_s']:.0f} | {int8['sentences_per_s'] / fp32['sentences_per_s']:.2f}x | "
                     f"{fp32['latency_ms_p50']:.2f} | {int8['latency_ms_p50']:.2f} | "
                     f"{fp32['latency_ms_p50'] / int8['latency_ms_p50']:.2f}x |")
    return lines


def summary_table(rows):
    """A Markdown table; F1 share and speed-up are relative to the first row (the teacher)."""
    base = rows[0]
    lines = ["| model | made | backend | params | P | R | F1 | F1 / teacher | latency p50 ms (b=1) | p95 ms | "
             "speed-up | test set s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = r["f1"] / base["f1"] if base["f1"] else float("nan")
        lines.append(f"| {r['model']} | {r.get('made', '')} | {r['backend']} | {r['parameters']:,} | "
                     f"{r['precision']:.4f} | "
                     f"{r['recall']:.4f} | {r['f1']:.4f} | {share:.2%} | {r['latency_ms_p50']:.2f} | "
                     f"{r['latency_ms_p95']:.2f} | "
                     f"{base['latency_ms_p50'] / r['latency_ms_p50']:.2f}x | {r['test_seconds']:.1f} |")
    return "\n".join(lines)


def plot_pareto(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, marker in MARKERS.items():  # every model x backend x precision
        points = [r for r in rows if r["precision_kind"] == kind]
        if not points:
            continue
        ax.scatter([r["sentences_per_s"] for r in points], [r["f1"] for r in points], marker=marker, label=kind)
        for r in points:
            ax.annotate(r["model"], (r["sentences_per_s"], r["f1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for kind in KIND.values():
        teacher = find_row(rows, TEACHER, kind)
        if teacher:
            ax.scatter([teacher["sentences_per_s"]], [teacher["f1"]], s=160, facecolors="none", edgecolors="red",
                       label=f"teacher ({kind})")
    ax.set_xlabel("throughput at batch 32 (sentences/s, higher is better)")
    ax.set_ylabel("test entity F1")
    ax.set_title("F1 against throughput: up and to the right is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
