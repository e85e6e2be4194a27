"""``run_pipeline.py``: every stage on one config, then the test-set table of every model.

teacher -> { teacher's width supernet -> exports | student -> student's width supernet -> exports }
-> table. The two branches need only ``DIR/teacher`` and run side by side when the cores allow
(``stage_pool``).
"""
import json
import logging
import os

from ner_compress.commands import stage_pool
from ner_compress.commands.stages import (DEMO_CONFIG, EXPORT_FLAGS, OFA_FLAGS, RECONSTRUCTION_FLAGS, STUDENT_FLAGS,
                                          TEACHER_FLAGS, load_teacher, parse_stage_config,
                                          pruned_teacher_config, export_keeping_fp32, run_ofa, run_reconstruction,
                                          run_student, run_teacher, start)
from ner_compress.compress import student
from ner_compress.core import layout
from ner_compress.core.artifacts import MANIFEST, read_manifest
from ner_compress.core.checkpoint import TRAINER_STATE, Checkpointer
from ner_compress.core.config import PipelineOptions, group_fields
from ner_compress.core.layout import ModelRef
from ner_compress.measure import benchmark, report
from ner_compress.models.e5_pretrained import resolve_model_path
from ner_compress.models.families import load_config
from ner_compress.models.modeling import teacher_config

log = logging.getLogger("ner_compress")


def widths(cfg):
    return sorted(cfg.width_mult_list, reverse=True)


def reconstruct(cfg, refs, data):
    """Each of ``refs`` refit against the teacher (unless ``--skip_reconstruction``)."""
    if cfg.skip_reconstruction:
        return
    teacher = load_teacher(cfg, data)
    for ref in refs:
        run_reconstruction(cfg, ref, data, teacher)


def teacher_widths(cfg, data=None):
    """The teacher's width supernet, each width refit, then the teacher and each width exported."""
    data = data or start(cfg)
    run_ofa(cfg, data)
    reconstruct(cfg, [ModelRef("teacher", width) for width in widths(cfg)], data)
    for width in [None, *widths(cfg)]:
        export_keeping_fp32(cfg, ModelRef("teacher", width), data)


def student_widths(cfg, data=None):
    """The student (refit), its own width supernet (each width refit), then the student and its widths exported."""
    data = data or start(cfg)
    run_student(cfg, data)
    reconstruct(cfg, [ModelRef("student")], data)
    run_ofa(cfg, data, "student")
    reconstruct(cfg, [ModelRef("student", width) for width in widths(cfg)], data)
    for width in [None, *widths(cfg)]:
        export_keeping_fp32(cfg, ModelRef("student", width), data)


def check_student_plan(cfg, data):
    """A student that cannot map to the teacher fails now, not after the teacher has trained."""
    source = resolve_model_path(cfg.model_name_or_path, cfg.cache_dir) if cfg.model_name_or_path else None
    if os.path.isdir(source or ""):
        planned = load_config(source)
        planned.num_hidden_layers = cfg.pretrained_layers or planned.num_hidden_layers
    elif not cfg.model_name_or_path:
        planned = teacher_config(cfg, data.labels, len(data.encoder.vocab), data.encoder.pad_id)
    else:
        return  # a hub name: checked once the teacher is there
    student.student_plan(cfg, planned)


def run_all(cfg):
    cfg = pruned_teacher_config(cfg)  # every stage after it reads the pruned model's vocabulary
    data = start(cfg)
    if cfg.run_student:
        check_student_plan(cfg, data)
    run_teacher(cfg, data)
    branches = [("teacher widths", teacher_widths)]
    if cfg.run_student:
        branches.append(("student and its widths", student_widths))
    stage_pool.run_branches(cfg, branches, data)
    log.info("measuring %d test sentences per model", len(data.splits.test))
    rows = [benchmark.summary_row(ref, layout.export_dir(cfg.output_dir, ref), data.splits.test, cfg.cpu_threads,
                                  cfg.device) for ref in layout.planned_models(cfg.width_mult_list, cfg.run_student)]
    speeds = training_speeds(cfg)
    report.write_report(layout.report_dir(cfg.output_dir), {"config": cfg.to_dict(), "rows": rows,
                                                            "training_speed": speeds},
                        pipeline_markdown(rows, speeds, reconstruction_lines(cfg.output_dir)),
                        "pipeline.json", "pipeline.md")
    return rows


def pipeline_markdown(rows, speeds, reconstruction):
    """The test-set table, then a line per training stage (speed, CPU-seconds) and per refit model."""
    return report.summary_table(rows) + "\n\n" + "\n".join(
        [f"- {stage} training: {v['train_sentences_per_s']:.1f} sentences/s ({v['train_seconds']:.0f} s, "
         f"{v.get('train_cpu_seconds', float('nan')):.0f} CPU-s incl. dev evaluation, {v['cpu_threads']} CPU thread(s))"
         for stage, v in speeds.items()] + reconstruction)


def reconstruction_lines(output_dir):
    """One line per refit model: dev F1 before and after, kept or not, CPU-seconds."""
    lines = []
    for ref in layout.trained_models(output_dir):
        if ref.width is None and ref.source == "teacher":
            continue
        record = read_manifest(*layout.trained_dir(output_dir, ref), verify_weights=False).get("reconstruction")
        if record:
            lines.append(f"- {ref.name} reconstruction: dev F1 {record['dev_f1_before']:.4f} -> "
                         f"{record['dev_f1_after']:.4f} ({'kept' if record['kept'] else 'not kept'}), "
                         f"{record['cpu_seconds']:.0f} CPU-s on {record['calibration']['sentences']} training "
                         f"sentences")
    return lines


def training_speeds(cfg):
    """Sentences/s and CPU-seconds of each training stage, from its last checkpoint (a stage that kept its
    step-0 weights still trained to the end), and its CPU threads, from its manifest."""
    top, out = max(cfg.width_mult_list), cfg.output_dir
    refs = [ModelRef("teacher"), ModelRef("teacher", top)]
    if cfg.run_student:
        refs += [ModelRef("student"), ModelRef("student", top)]
    speeds = {}
    for ref in refs:
        directory, stage = layout.trained_dir(out, ref)
        name = ref.source if ref.width is None else os.path.basename(layout.ofa_dir(out, ref.source))
        checkpoint = Checkpointer(layout.checkpoint_dir(out, name)).latest()  # checkpoints/ofa, student_ofa
        if checkpoint and os.path.isfile(os.path.join(directory, MANIFEST)):
            with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as fh:
                speed = json.load(fh).get("speed", {})
            runtime = read_manifest(directory, stage, verify_weights=False).get("runtime", {})
            speeds[name.replace("_", " ")] = {**speed, "cpu_threads": runtime.get("cpu_threads")}
    return speeds


def run_all_cli(argv=None):
    names = sorted(set(TEACHER_FLAGS + OFA_FLAGS + EXPORT_FLAGS + STUDENT_FLAGS + RECONSTRUCTION_FLAGS
                       + group_fields(PipelineOptions))
                   - {"width_mult", "output_dir"})  # every width is exported; --output_dir is always there
    cfg, _ = parse_stage_config("Run every stage on one config and print the test-set table.", names, argv,
                          default_config=DEMO_CONFIG)
    run_all(cfg)
