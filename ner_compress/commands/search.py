"""Stage 8, ``tools/search.py``: the sub-network for a latency budget, per-layer widths searched on this
machine's measured latency, written and exported like any model (``search/<name>``, ``export/search_<name>``).

The latency is ONNX Runtime's (``--backend paddle``: Paddle Inference's), milliseconds per sentence over dev
sentences' real lengths at ``--batch_size`` (1: one request at a time; 32: length-sorted batches), model only
(text to ids and Viterbi are the same for every model). The teacher's exported graph is timed for the budget
(``--speedup``) and for what the layers do not cost; the layers come from the latency table
(``measure/latency_table``, ``measure/paddle_latency``), cached under
``search/latency/`` and measured again when the machine, threads or libraries differ; a cached table is scaled
to the teacher timed at the search's start. The Fisher importance is cached in ``search/importance.npz``.
"""
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ner_compress.commands import stages
from ner_compress.compress import searched_model
from ner_compress.compress.plan_search import Plan, Values, candidate_plans, distinct
from ner_compress.compress.training import save_model_dir
from ner_compress.core import layout
from ner_compress.core.artifacts import MANIFEST, read_manifest, write_json
from ner_compress.core.config import ReconstructionOptions, group_fields, options_from_args
from ner_compress.core.options import check_schedules, flag_field, schedule_of, with_schedule
from ner_compress.core.errors import UserError
from ner_compress.data.window_scores import model_inputs
from ner_compress.deploy.backends import onnx_path_for
from ner_compress.models.width_plan import layer_plan
from ner_compress.measure import latency_table as lt
from ner_compress.measure import paddle_latency

log = logging.getLogger("ner_compress")
# what the search reads of the run (its data, importance batches, the refit's calibration)
SEARCH_CONFIG_FLAGS = group_fields(ReconstructionOptions) + ["dev_limit", "importance_batches", "cache_dir",
                                                             "vocab_file", "cpu_threads", "verbose"]


# no training by default: measured, 300 steps beat the refit on a half-trained teacher (+2.8 dev points) and
# once in three on a trained one (+0.6), for 9 of a search's minutes (docs/search.md)
@with_schedule("search", "search_", "distillation of the chosen model (default 0 steps: the refit is the model; "
               "e.g. 300 on a teacher trained briefly)", learning_rate=1e-4, max_steps=0, num_train_epochs=0.0,
               eval_steps=50, also=" (and at step 0, the refit)")
@dataclass
class SearchOptions:
    """The budget, what the latency is measured on, and how the chosen model is trained."""
    latency_ms: Optional[float] = flag_field(None, "the budget: milliseconds per sentence at --batch_size (model "
                                             "only, ONNX Runtime); give this or --speedup")
    speedup: Optional[float] = flag_field(None, "the budget as a speed-up over the teacher's measured latency")
    batch_size: int = flag_field(1, "sentences per call the latency is measured at: 1 (one request) or 32",
                                 choices=[1, 32])
    backend: str = flag_field("onnxruntime", "the runtime the latency is for: onnxruntime (the fused ONNX graph) "
                              "or paddle (Paddle Inference on the static graph, oneDNN)",
                              choices=["onnxruntime", "paddle"])
    precision: str = flag_field("fp32", "fp32 or int8 (ONNX Runtime only: the export's INT8 copy)",
                                choices=["fp32", "int8"])
    threads: Optional[int] = flag_field(None, "CPU threads the latency is measured with (default: all cores)")
    workload_sentences: int = flag_field(128, "dev sentences whose lengths the latency is measured on")
    name: Optional[str] = flag_field(None, "the searched model's name (default: from the budget, e.g. b1_4.2ms)")
    skip_export: bool = flag_field(False, "write search/<name> only; export it later")


def check_options(opts):
    if (opts.latency_ms is None) == (opts.speedup is None):
        raise UserError("tools/search.py: give the budget as exactly one of --latency_ms or --speedup")
    for flag in ("latency_ms", "speedup"):
        value = getattr(opts, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} {value}: must be positive")
    if opts.backend == "paddle" and opts.precision != "fp32":
        raise UserError(f"--backend paddle --precision {opts.precision}: an export has no Paddle INT8 program (the "
                        f"benchmark calibrates one when it runs); use --precision fp32, or --backend onnxruntime")
    if opts.workload_sentences < 1:
        raise UserError(f"--workload_sentences {opts.workload_sentences}: use at least 1")
    check_schedules(opts)


def exported_graph(output_dir, ref, opts):
    """What the backend runs of an export: the ONNX graph the tagger loads (``backends.onnx_path_for``), or for
    Paddle Inference the static graph's directory."""
    static = os.path.join(layout.export_dir(output_dir, ref), "static")
    return static if opts.backend == "paddle" else onnx_path_for(static, opts.precision)


def export_ms(graph, opts, feeds, workload, threads):
    """Milliseconds per sentence of ``exported_graph`` on the workload, with the budget's backend."""
    if opts.backend == "paddle":
        return paddle_latency.static_ms(graph, feeds, workload, threads)
    return lt.model_ms(graph, feeds, workload, threads)


def teacher_graph(output_dir, opts):
    """The teacher's export the budget is measured on, or a one-line error saying how to make it."""
    path = exported_graph(output_dir, layout.ModelRef("teacher"), opts)
    if not os.path.exists(path):
        raise UserError(f"{path}: missing; the search times the exported teacher: run `python tools/export.py "
                        f"--teacher --output_dir {output_dir}` first" +
                        (" (INT8 kept)" if opts.precision == "int8" else ""))
    return path


def part_timer(cfg, opts, shape, feeds, workload, threads):
    """``part_time(part, width)`` of the backend's latency table (``latency_table``, ``paddle_latency``)."""
    if opts.backend == "paddle":
        teacher_dir = layout.stage_dir(cfg.output_dir, "teacher")
        return paddle_latency.part_timer(teacher_dir, teacher_graph(cfg.output_dir, opts), feeds, workload, threads)
    return lt.onnx_part_timer(shape, workload, threads, opts.precision)


def workload_feeds(data, opts):
    """Model inputs over ``workload_sentences`` dev windows (seeded sample), batched and padded as a tagger
    would: one window per call at batch 1, length-sorted batches otherwise."""
    windows = data.windows("dev")
    chosen = np.random.RandomState(0).permutation(len(windows))[: opts.workload_sentences]
    chosen = chosen if opts.batch_size == 1 else sorted(chosen, key=lambda i: len(windows[i].input_ids))
    calls = [[windows[i] for i in chosen[j: j + opts.batch_size]] for j in range(0, len(chosen), opts.batch_size)]
    return [model_inputs(call, data.encoder.pad_id) for call in calls]


def layer_shape(config):
    heads = int(config.num_attention_heads)
    return lt.LayerShape(int(config.hidden_size), int(config.hidden_size) // heads, heads,
                         int(config.intermediate_size))


def latency_model(cfg, opts, teacher, feeds, workload, threads):
    """(the latency table, the teacher's milliseconds per sentence now, the scale applied). The teacher is
    timed when the table is measured, for what the layers do not cost. A cached table is scaled to the teacher
    timed again now: the speed of this shared machine drifts (one graph timed 8.6 and 9.9 ms two hours apart),
    and a budget is for the machine as it is."""
    shape = layer_shape(teacher.config)
    full = ([shape.heads] * int(teacher.config.num_hidden_layers), [shape.intermediate] *
            int(teacher.config.num_hidden_layers))

    key = lt.machine_key(threads, opts.backend, opts.precision, workload, shape)

    def teacher_ms():
        return export_ms(teacher_graph(cfg.output_dir, opts), opts, feeds, workload, threads)

    def measure():
        measured = teacher_ms()
        return lt.measure_table(shape, key, part_timer(cfg, opts, shape, feeds, workload, threads),
                                lambda table: max(0.0, measured - table.predict(*full)), log)

    path = os.path.join(cfg.output_dir, layout.SEARCH_DIR, "latency",
                        f"{opts.backend}_{opts.precision}_b{opts.batch_size}_t{threads}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    teacher_graph(cfg.output_dir, opts)  # refused before anything is measured
    table, cached = lt.cached_table(path, key, measure)
    when_measured = table.predict(*full)
    scale = teacher_ms() / when_measured if cached else 1.0
    log.info("search: teacher %.3f ms per sentence at batch %d; latency table %s (%s)", when_measured * scale,
             opts.batch_size, f"cached, scaled {scale:.3f}x to the teacher now" if cached else "measured", path)
    return table.scaled(scale), when_measured * scale, scale


def budget_ms(opts, teacher_ms):
    budget = opts.latency_ms if opts.latency_ms is not None else teacher_ms / opts.speedup
    if budget >= teacher_ms:
        flag = f"--latency_ms {opts.latency_ms}" if opts.latency_ms is not None else f"--speedup {opts.speedup}"
        raise UserError(f"{flag}: a budget of {budget:.3f} ms is not below the teacher's measured {teacher_ms:.3f} ms "
                        f"per sentence; the teacher itself meets it")
    return budget


def uniform_plan(table, config, budget):
    """The widest uniform cut within ``budget`` (whole heads, neurons in the same ratio: ``layer_plan``'s rule),
    or None."""
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    for kept in range(heads, 0, -1):
        cut = layer_plan(config, [kept] * layers)
        predicted = table.predict(cut.layer_heads, cut.layer_neurons)
        if predicted <= budget:
            return Plan(cut.layer_heads, cut.layer_neurons, predicted)
    return None


@contextmanager
def timed(seconds, phase):
    """Wall seconds of the block into ``seconds[phase]``: where a search's minutes go, in its record."""
    start = time.perf_counter()
    yield
    seconds[phase] = round(time.perf_counter() - start, 1)


def run_search(cfg, opts):
    """Search, write ``search/<name>``, export it and time it: the manifest of the searched model."""
    check_options(opts)
    data = stages.start(cfg)
    teacher = stages.load_teacher(cfg, data)
    threads = opts.threads or os.cpu_count() or 1
    feeds = workload_feeds(data, opts)
    workload = lt.Workload.from_feeds(feeds, opts.batch_size)
    seconds = {}
    with timed(seconds, "latency_model"):
        table, teacher_ms, scale = latency_model(cfg, opts, teacher, feeds, workload, threads)
    budget = budget_ms(opts, teacher_ms)
    with timed(seconds, "importance"):
        ranked, state, heads, neurons = searched_model.ranked_teacher(
            cfg, data, teacher, os.path.join(cfg.output_dir, layout.SEARCH_DIR, "importance.npz"))
    values = Values.from_importance(heads, neurons, lt.neuron_grid(neurons.shape[1], heads.shape[1]))
    plans = [(values.source, plan) for plan in candidate_plans(values, table, budget)]
    uniform = uniform_plan(table, teacher.config, budget)
    if uniform:
        plans.append(("uniform", uniform))
    plans = distinct(plans, key=lambda pair: pair[1])
    teacher_dir = layout.stage_dir(cfg.output_dir, "teacher")
    with timed(seconds, "candidates"):
        model, plan, candidates = searched_model.best_candidate(cfg, data, teacher_dir, ranked, state, plans)
    name = opts.name or f"b{opts.batch_size}_{budget:.3g}ms"
    ref = layout.ModelRef("search", label=name)
    out_dir = layout.trained_dir(cfg.output_dir, ref)[0]
    record = {"budget_ms": budget, "teacher_ms": teacher_ms, "predicted_ms": plan.predicted_ms,
              "batch_size": opts.batch_size, "backend": opts.backend, "precision": opts.precision, "threads": threads,
              "candidates": candidates, "latency_table": {**table.machine, "scaled": round(scale, 4)},
              "seconds": seconds}
    best_f1 = max(c["dev_f1"] for c in candidates)
    schedule = schedule_of(opts, "search")
    if schedule.max_steps > 0 or schedule.num_train_epochs > 0:
        with timed(seconds, "training"):
            record["training"] = searched_model.distil(cfg, data, ranked, model, schedule,
                                                       layout.checkpoint_dir(cfg.output_dir, f"search_{name}"))
        best_f1 = record["training"]["dev_f1"]
    save_model_dir(model, data, cfg, {"dev_f1": best_f1}, out_dir, "search",
                   inputs={"teacher": read_manifest(teacher_dir, "teacher", verify_weights=False)},
                   search=record, layer_heads=list(plan.heads), layer_ffn_neurons=list(plan.neurons))
    if not opts.skip_export:  # a refused INT8 copy stops an int8 search only: it has nothing else to time
        with timed(seconds, "export"):
            (stages.run_export if opts.precision == "int8" else stages.export_keeping_fp32)(cfg, ref, data)
        with timed(seconds, "measure"):
            record["measured_ms"] = export_ms(exported_graph(cfg.output_dir, ref, opts), opts, feeds, workload,
                                              threads)
        record_measured(out_dir, record)
    log.info("search: %s -> %s: %s, dev F1 %.4f, predicted %.3f ms%s (budget %.3f, teacher %.3f)", name, out_dir,
             plan.describe(), best_f1, plan.predicted_ms,
             f", measured {record['measured_ms']:.3f} ms" if "measured_ms" in record else "", budget, teacher_ms)
    log.info("search: %s wall seconds", ", ".join(f"{phase} {value:.0f}" for phase, value in seconds.items()))
    return record


def record_measured(out_dir, record):
    """The search record with the exported model's measured latency, into the searched model's manifest."""
    manifest = read_manifest(out_dir, "search", verify_weights=False)
    write_json(os.path.join(out_dir, MANIFEST), {**manifest, "search": record})


def search_cli(argv=None):
    cfg, args = stages.parse_stage_config(
        "Stage 8: the sub-network with the best dev F1 within a latency budget (per-layer heads and neurons).",
        SEARCH_CONFIG_FLAGS, argv, extra=stages.flags_of(SearchOptions), inherit=stages.recorded_config("teacher"))
    run_search(cfg, options_from_args(SearchOptions, args))
