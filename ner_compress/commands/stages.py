"""The stages as functions of a Config, and the command lines that call them (all of them in order:
``commands.pipeline``). Where each stage reads and writes: ``core.layout``.
"""
import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional

from ner_compress.measure import benchmark, report
from ner_compress.deploy import export
from ner_compress.core import layout, parallel, runtime
from ner_compress.compress import reconstruction_stage, student, supernet, training, vocab_pruning
from ner_compress.deploy.backends import check_backend
from ner_compress.deploy.onnx_quant import calibration_sentences
from ner_compress.core.artifacts import MANIFEST, check_same_inputs, read_manifest, write_json
from ner_compress.core.layout import SOURCES, ModelRef
from ner_compress.core.config import (DataOptions, DropoutOptions, ExportOptions, HiddenMatchOptions, ModelOptions,
                                      OfaOptions, ReconstructionOptions, RunOptions, StudentOptions, TeacherTraining,
                                      add_dataclass_flags, flag_field, group_fields, options_from_args, parse_config)
from ner_compress.models.model_data import prepare_data
from ner_compress.core.errors import Int8Refused, UserError
from ner_compress.models.families import load_config, model_class_for
from ner_compress.models.modeling import check_model_options, load_pretrained

log = logging.getLogger("ner_compress")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yaml")
DATA_FLAGS = group_fields(DataOptions)
TEACHER_FLAGS = group_fields(DataOptions, RunOptions, ModelOptions, DropoutOptions, TeacherTraining)
OFA_FLAGS = group_fields(DataOptions, RunOptions, HiddenMatchOptions, OfaOptions)
STUDENT_FLAGS = group_fields(DataOptions, RunOptions, DropoutOptions, HiddenMatchOptions, StudentOptions,
                             ReconstructionOptions)
RECONSTRUCTION_FLAGS = group_fields(DataOptions, RunOptions, ReconstructionOptions) + ["width_mult"]
EXPORT_FLAGS = group_fields(ExportOptions) + ["device", "cpu_threads", "vocab_file", "cache_dir", "verbose"]
# how the previous stage was run, not what it was run on
NOT_INHERITED = {"resume", "resume_from", "output_dir"}


def parse_stage_config(description, names, argv=None, **kwargs):
    """``parse_config``, then the checks that need the model families (the core config cannot make them)."""
    cfg, args = parse_config(description, names, argv, **kwargs)
    check_model_options(cfg)
    return cfg, args


def recorded_config(stage):
    """The resolved config a finished stage (``teacher``) recorded, or {} when there is none yet."""
    def inherit(output_dir):
        directory = layout.stage_dir(output_dir, stage)
        if not os.path.isfile(os.path.join(directory, MANIFEST)):
            return {}
        recorded = read_manifest(directory, stage, verify_weights=False).get("config", {})
        return {k: v for k, v in recorded.items() if k not in NOT_INHERITED}
    return inherit


def start(cfg):
    """What every stage does first: processes, logging, device and threads; returns the data it runs on."""
    parallel.init()
    runtime.setup_logging()
    training.set_device(cfg.device)
    if cfg.device == "cpu":
        runtime.set_cpu_threads(cfg.cpu_threads)
        runtime.log_once()
    return prepare_data(cfg)


def pruned_teacher_config(cfg):
    """With ``--prune_vocab``: the config that fine-tunes from DIR/pruned_model (pruned, or reused)."""
    if not cfg.prune_vocab:
        return cfg
    parallel.init()
    runtime.setup_logging()
    return vocab_pruning.pruned_config(cfg, os.path.join(cfg.output_dir, vocab_pruning.PRUNED_DIR))


def run_teacher(cfg, data=None):
    data = data or start(cfg)
    return training.train_teacher(cfg, data, layout.stage_dir(cfg.output_dir, "teacher"),
                                  layout.checkpoint_dir(cfg.output_dir, "teacher"))


def run_student(cfg, data=None):
    """Distil DIR/teacher into the configured student (DIR/student/)."""
    teacher_dir = layout.stage_dir(cfg.output_dir, "teacher")
    teacher_manifest = read_manifest(teacher_dir, "teacher")
    student.student_plan(cfg, load_config(teacher_dir, "teacher"))  # a bad shape or match fails before data
    data = data or start(cfg)
    teacher = load_checked(teacher_dir, "teacher", teacher_manifest, data)
    return student.train_student(cfg, data, teacher, teacher_manifest, layout.stage_dir(cfg.output_dir, "student"),
                                 layout.checkpoint_dir(cfg.output_dir, "student"))


def run_ofa(cfg, data=None, source="teacher"):
    """The width supernet of ``source`` (teacher or student), distilled from ``source`` itself:
    its hidden states are matched layer by layer, so they must have the supernet's depth and size."""
    source_dir = layout.stage_dir(cfg.output_dir, source)
    teacher_manifest = read_manifest(source_dir, source)
    data = data or start(cfg)
    teacher = load_checked(source_dir, source, teacher_manifest, data)
    training.set_seed(cfg.seed)
    out_dir = layout.ofa_dir(cfg.output_dir, source)
    best, history = supernet.train_supernet(cfg, data, teacher, teacher_manifest, out_dir,
                                     layout.checkpoint_dir(cfg.output_dir, os.path.basename(out_dir)))
    if not parallel.is_writer():
        return best, history
    summary = {"stage": "ofa-summary", "widths": sorted(best), "best": best,
               "loss_history": history, "teacher": teacher_manifest.get("metrics", {})}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    for width, result in sorted(best.items(), reverse=True):
        log.info("%s: width %s best dev F1 %.4f (step %s)", os.path.basename(out_dir), width, result["dev_f1"],
                 result.get("step"))
    return best, history


def load_checked(directory, stage, manifest, data):
    """The model a finished stage wrote, once its manifest's labels and vocabulary match ``data``."""
    check_same_inputs(manifest, data.labels, data.vocab_sha256, directory)
    return load_pretrained(model_class_for(directory, stage), directory, flag=stage)


def load_teacher(cfg, data):
    """DIR/teacher as trained, checked against ``data``."""
    teacher_dir = layout.stage_dir(cfg.output_dir, "teacher")
    return load_checked(teacher_dir, "teacher", read_manifest(teacher_dir, "teacher"), data)


def run_reconstruction(cfg, ref, data=None, teacher=None):
    """Refit one trained model against the teacher (``ref``: a width of a supernet, or the student)."""
    data = data or start(cfg)
    teacher = teacher or load_teacher(cfg, data)
    if ref.width is None:
        return reconstruction_stage.reconstruct_model_dir(cfg, data, teacher, layout.stage_dir(cfg.output_dir,
                                                                                              ref.source), ref.source)
    directory = layout.require_trained_width(layout.ofa_dir(cfg.output_dir, ref.source), ref.width)
    return reconstruction_stage.reconstruct_width(cfg, data, teacher, directory, ref.width, ref.name)


def run_export(cfg, ref, data=None):
    """Export one model: a width of its source's supernet, or the source itself (``ref.width`` None)."""
    data = data or start(cfg)
    out_dir = layout.export_dir(cfg.output_dir, ref)
    if ref.width is None:
        source_dir, stage = layout.trained_dir(cfg.output_dir, ref)
        return export.export_full_width(cfg, data, source_dir, out_dir, stage=stage)
    return export.export_width(cfg, data, layout.ofa_dir(cfg.output_dir, ref.source), out_dir, ref.width)


def export_keeping_fp32(cfg, ref, data):
    """``run_export``; a refused INT8 copy is a warning: the FP32 export is complete and the caller goes on."""
    try:
        run_export(cfg, ref, data)
    except Int8Refused as refusal:
        log.warning("INT8 not kept: %s", refusal)


def chosen_models(output_dir, names=None):
    """The exported models ``--models`` names (all of them without it); an unknown name is refused in one line."""
    exported = layout.exported_models(output_dir)
    unknown = sorted(set(names or ()) - {ref.name for ref in exported})
    if unknown:
        raise UserError(f"--models {' '.join(repr(n) for n in unknown)}: not exported under {output_dir}; exported: "
                        f"{', '.join(repr(ref.name) for ref in exported) or 'none'}")
    return [ref for ref in exported if not names or ref.name in names]


def run_benchmark(cfg, opts, command):
    """Measure the teacher and every exported width; write DIR/report/{results.json,report.md,pareto.png}."""
    data = start(cfg)
    if opts.export_missing:
        export_missing(cfg, data)
    models = models_to_measure(cfg, opts)
    pruned = pruning_sizes(cfg)
    report_dir = opts.report_dir or layout.report_dir(cfg.output_dir)
    measured = measure(cfg, opts, models, data.splits, report_dir)
    results = {"command": command, **measured, "vocab_pruning": pruned, "targets": report.all_targets(measured["rows"])}
    report.write_report(report_dir, results, report.markdown(results), "results.json", "report.md")
    report.plot_pareto(results["rows"], os.path.join(report_dir, "pareto.png"))
    return results


def export_missing(cfg, data):
    """``--export_missing``: each trained model without an export is exported now."""
    for ref in layout.trained_models(cfg.output_dir):
        if not layout.is_exported(cfg.output_dir, ref):
            run_export(cfg, ref, data)


def models_to_measure(cfg, opts):
    """(ref, export dir) of each chosen export, once every chosen backend is known to be able to run it."""
    models = [(ref, layout.export_dir(cfg.output_dir, ref)) for ref in chosen_models(cfg.output_dir, opts.models)]
    if not models:
        raise UserError(f"{os.path.join(cfg.output_dir, 'export')}: no exported model; run `python tools/export.py "
                        f"--teacher` and `python tools/export.py --width_mult 0.5`, or pass --export_missing")
    for backend in opts.backends:
        for _, directory in models:
            check_backend(backend, os.path.join(directory, "static"))
    return models


def pruning_sizes(cfg):
    """The teacher's vocabulary pruning (rows before and after), when it started from a pruned model."""
    return vocab_pruning.pruning_sizes(recorded_config("teacher")(cfg.output_dir).get("model_name_or_path"))


def measure(cfg, opts, models, splits, report_dir):
    """Every model x backend x precision on the test set, each in a fresh process; the rows with the machine
    and the settings they were measured with."""
    from tqdm import tqdm

    work_dir = os.path.join(report_dir, "models")
    os.makedirs(work_dir, exist_ok=True)
    sentences = splits.test
    # Paddle INT8 calibrates on training sentences: dev and test are what it is judged on
    calibration = calibration_sentences(splits.train, opts.calibration_sentences, opts.calibration_seed)
    # the ceiling first: after the predictors run, their OpenMP threads keep spinning and steal cores
    ceiling = benchmark.matmul_gflops(opts.threads)
    with tqdm(desc="benchmark", dynamic_ncols=True) as bar:
        rows = report.annotate(benchmark.measure_in_fresh_processes(models, sentences, calibration, work_dir, opts,
                                                                    bar.set_postfix_str))
    return {"machine": benchmark.machine_info(), "threads": opts.threads or os.cpu_count(),
            "matmul_gflops": ceiling, "batch_size": opts.batch_size, "repeats": opts.repeats,
            "test_sentences": len(sentences), "test_source": splits.sources.get("test", "MSRA test"),
            "speed_sentences": min(len(sentences), opts.speed_sentences),
            "latency_sentences": min(len(sentences), opts.latency_sentences), "rows": rows}


def flags_of(cls):
    """The ``extra`` of ``parse_stage_config`` that adds the fields of the options dataclass ``cls``."""
    return lambda parser: add_dataclass_flags(parser, cls)


def benchmark_cli(argv=None):
    cfg, args = parse_stage_config("Accuracy, size and speed of the teacher and every exported width, side by side.",
                             ["test_file", "test_limit", "cache_dir", "vocab_file", "verbose"], argv,
                             extra=flags_of(benchmark.BenchmarkOptions), inherit=recorded_config("teacher"))
    run_benchmark(cfg, options_from_args(benchmark.BenchmarkOptions, args),
                  "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]))


def train_teacher_cli(argv=None):
    cfg, _ = parse_stage_config("Fine-tune the BERT teacher; best dev F1 goes to DIR/teacher/.", TEACHER_FLAGS, argv)
    run_teacher(pruned_teacher_config(cfg))


@dataclass
class PruneOutput:
    """Where ``tools/prune_vocab.py`` writes."""
    out: Optional[str] = flag_field(None, "the pruned model directory to write (default: DIR/pruned_model)")


def prune_vocab_cli(argv=None):
    cfg, args = parse_stage_config("Cut a local model directory's vocabulary to the characters of the training corpus "
                             "(plus --keep_chars_file and the special tokens).",
                             DATA_FLAGS + ["model_name_or_path", "keep_chars_file", "verbose"], argv,
                             extra=flags_of(PruneOutput))
    runtime.setup_logging()
    out = options_from_args(PruneOutput, args).out or os.path.join(cfg.output_dir, vocab_pruning.PRUNED_DIR)
    print(f"{out}: {vocab_pruning.summary(vocab_pruning.prune(cfg, cfg.model_name_or_path, out))}")


def distill_cli(argv=None):
    cfg, _ = parse_stage_config("Distil the teacher into a shallower or narrower student; best dev F1 goes to "
                          "DIR/student/.", STUDENT_FLAGS, argv, inherit=recorded_config("teacher"))
    run_student(cfg)


@dataclass
class SourceOption:
    """Which model's width supernet a stage uses (``--from``)."""
    source: str = flag_field("teacher", "the model whose width supernet to use (student: DIR/student_ofa/)",
                             choices=SOURCES, flag="from")


@dataclass
class ReconstructTarget(SourceOption):
    """The model ``tools/reconstruct.py`` refits: a width of ``--from``'s supernet, or the student."""
    student: bool = flag_field(False, "refit the student instead of a width")

    def ref(self, width_mult):
        return ModelRef("student") if self.student else ModelRef(self.source, width_mult)


@dataclass
class ExportTarget(SourceOption):
    """The model ``tools/export.py`` exports: a width of ``--from``'s supernet, or one named by its flag."""
    teacher: bool = flag_field(False, "export the teacher instead of a width")
    student: bool = flag_field(False, "export the student instead of a width")
    search: Optional[str] = flag_field(
        None, "export the searched model search/NAME (tools/search.py) instead of a width", metavar="NAME")

    def ref(self, width_mult):
        if sum(map(bool, (self.teacher, self.student, self.search))) > 1:
            raise UserError("--teacher, --student and --search: export one model at a time")
        if self.search:
            return ModelRef("search", label=self.search)
        if self.teacher or self.student:
            return ModelRef("student" if self.student else "teacher")
        return ModelRef(self.source, width_mult)


def reconstruct_cli(argv=None):
    cfg, args = parse_stage_config("Refit a width of a supernet (or the student) layer by layer against the teacher on "
                                   "training sentences; kept in place when dev F1 rises.", RECONSTRUCTION_FLAGS, argv,
                                   extra=flags_of(ReconstructTarget), inherit=recorded_config("teacher"))
    run_reconstruction(cfg, options_from_args(ReconstructTarget, args).ref(cfg.width_mult))


def ofa_compress_cli(argv=None):
    cfg, args = parse_stage_config("Distil the teacher (or --from student) into an OFA width supernet; best per width "
                             "goes to DIR/ofa/ (DIR/student_ofa/).", OFA_FLAGS, argv, extra=flags_of(SourceOption),
                             inherit=recorded_config("teacher"))
    run_ofa(cfg, source=options_from_args(SourceOption, args).source)


def export_cli(argv=None):
    cfg, args = parse_stage_config("Export a width of a supernet (or --teacher, --student) under DIR/export/: "
                                   "dynamic and static graph and ONNX (FP32, fused, INT8), each parity-checked.",
                             EXPORT_FLAGS, argv, extra=flags_of(ExportTarget), inherit=recorded_config("teacher"))
    run_export(cfg, options_from_args(ExportTarget, args).ref(cfg.width_mult))

