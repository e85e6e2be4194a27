"""Cut a width out of the supernet (or take the teacher or student), save it reloadable (dynamic), as a static graph
and as ONNX (FP32, fused, INT8), check parity.

``DIR/export/width_W/dynamic``: ``PrunedBertForTokenClassification.from_pretrained`` loads it
(config with each layer's heads and neurons, tokenizer, labels). ``DIR/export/width_W/static``: ``paddle.jit.save``
with int64 ``input_ids`` and ``token_type_ids`` of shape [None, None], plus what
``inference.StaticTagger`` needs. ``DIR/export/width_W/onnx/model.onnx``: the static graph
converted by paddle2onnx for ONNX Runtime. Before the directory is swapped in, the supernet at
that width, the reloaded dynamic model, the static predictor and ONNX Runtime must agree on the logits.
"""
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import paddle
from paddle.static import InputSpec
from paddleslim.nas.ofa import OFA

from ner_compress.core.artifacts import atomic_dir, check_same_inputs, read_manifest, write_json, write_manifest
from ner_compress.data.corpus import collate
from ner_compress.data.vocab import copy_vocab
from ner_compress.core.errors import Int8Refused
from ner_compress.deploy.backends import ONNX_DIR, ONNX_FILE, OnnxTagger, StaticTagger, export_onnx
from ner_compress.deploy.onnx_variants import int8_summary, write_variants
from ner_compress.deploy.parity import check_parity
from ner_compress.core.static_files import MODEL_PREFIX
from ner_compress.deploy.inference import INFERENCE_META
from ner_compress.core import layout
from ner_compress.core.console import detail
from ner_compress.core.checkpoint import load_weights
from ner_compress.models.families import load_config, model_class_for, save_tokenizer
from ner_compress.models.modeling import build_sub_model, count_parameters, load_pretrained, numpy_logits
from ner_compress.models.width_plan import plan_of, width_plan
from ner_compress.compress.supernet import SUPERNET_WEIGHTS, ofa_logits, set_plan, to_supernet

log = logging.getLogger("ner_compress")
INPUT_SPEC = [InputSpec([None, None], "int64", name="input_ids"),
              InputSpec([None, None], "int64", name="token_type_ids")]


def load_supernet_width(source_dir):
    """The supernet as trained (OFA wrapper, no teacher) and its raw weights."""
    model = model_class_for(source_dir, "ofa")(load_config(source_dir, "ofa"))
    state = load_weights(os.path.join(source_dir, SUPERNET_WEIGHTS))
    ofa_model = OFA(to_supernet(model), elastic_order=["width"])
    ofa_model.model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    ofa_model.model.eval()
    return ofa_model, state


class TokenLogits(paddle.nn.Layer):
    """Encoder then classifier, ids in and logits out: the one graph every family exports. The
    token classifiers' own forwards branch on ``return_dict`` and labels in ways dy2static
    cannot always trace (RoBERTa's), and in eval mode their dropout is the identity."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids):
        out = self.model.base_model(input_ids, token_type_ids=token_type_ids)
        return self.model.classifier(out[0] if isinstance(out, (tuple, list)) else out)


def save_static(model, static_dir, labels, max_seq_length, vocab_file):
    os.makedirs(static_dir, exist_ok=True)
    # full_graph: Paddle 2.6's default; Paddle 3 defaults to SOT tracing, which ignores input_spec
    static = paddle.jit.to_static(TokenLogits(model), input_spec=INPUT_SPEC, full_graph=True)
    paddle.jit.save(static, os.path.join(static_dir, MODEL_PREFIX))
    copy_vocab(vocab_file, static_dir)  # with its lookup rule: predict and serve map characters as training did
    write_json(os.path.join(static_dir, INFERENCE_META),
               {"labels": list(labels), "max_seq_length": max_seq_length})


def sample_inputs(data, n=16):
    windows = data.windows("dev")[:n]
    batch = collate(windows, data.encoder.pad_id)
    return batch["input_ids"], batch["token_type_ids"]


@dataclass(frozen=True)
class ExportJob:
    """One model to export: ``reference`` maps (input_ids, token_type_ids) to the logits of the model as trained
    (``reference_name``: the supernet at ``plan``, the teacher or the student); ``manifest``: its stage's."""
    model: Any
    plan: Any  # the WidthPlan it was cut to
    manifest: dict
    reference_name: str
    reference: Callable


@dataclass(frozen=True)
class ExportDirs:
    """The three formats of one export, under the scratch dir that is swapped in at the end."""
    dynamic: str
    static: str
    onnx: str

    @classmethod
    def under(cls, root):
        return cls(*(os.path.join(root, sub) for sub in ("dynamic", "static", ONNX_DIR)))

    @property
    def onnx_file(self):
        return os.path.join(self.onnx, ONNX_FILE)


def write_export(cfg, data, job, out_dir):
    """Write, check, swap in, report: every format into a scratch dir, held to the reference's logits; a refused
    INT8 copy raises ``Int8Refused`` once the FP32 export is in place. Returns the parity diffs."""
    inputs = sample_inputs(data)
    check = partial(check_parity, job.reference_name, job.reference(*inputs))
    with atomic_dir(out_dir) as tmp:
        dirs = ExportDirs.under(tmp)
        write_formats(job.model, data, cfg, dirs)
        diffs = check(format_logits(dirs, cfg, inputs))
        detail.info("export parity vs %s: %s", job.reference_name, {k: f"{v:.1e}" for k, v in diffs.items()})
        onnx_meta = write_onnx_variants(cfg, data, dirs, job, check, inputs)
        write_manifests(dirs, cfg, data, job, diffs, onnx_meta)
    report_export(out_dir, job.reference_name, diffs, onnx_meta)
    return diffs


def write_formats(model, data, cfg, dirs):
    """The dynamic model (with its tokenizer), the static graph, and the static graph as ONNX."""
    model.save_pretrained(dirs.dynamic, safe_serialization=True)
    save_tokenizer(model, data.vocab_file, dirs.dynamic)
    save_static(model, dirs.static, data.labels, cfg.max_seq_length, data.vocab_file)
    os.makedirs(dirs.onnx)
    export_onnx(dirs.static, dirs.onnx_file)


def format_logits(dirs, cfg, inputs):
    """Each written format's logits on ``inputs``, as a user would load it."""
    reloaded = model_class_for(dirs.dynamic).from_pretrained(dirs.dynamic)
    reloaded.eval()
    return {"reloaded dynamic model": numpy_logits(reloaded, *inputs),
            "static predictor": StaticTagger(dirs.static, device=cfg.device, threads=cfg.cpu_threads).logits(*inputs),
            "onnx runtime": OnnxTagger(dirs.static, dirs.onnx_file, threads=cfg.cpu_threads).logits(*inputs)}


def write_onnx_variants(cfg, data, dirs, job, check, inputs):
    """The fused and INT8 ONNX files (``onnx_variants``); the manifest's ``onnx`` entry."""
    return write_variants(cfg, data, dirs.static, dirs.onnx_file, job.plan, job.model.config.num_hidden_layers, check,
                          inputs)


def write_manifests(dirs, cfg, data, job, diffs, onnx_meta):
    """One manifest per format, naming the stage the model came from; the ONNX one also says what fused and
    what INT8 copy was kept."""
    model, manifest = job.model, job.manifest
    for sub in (dirs.dynamic, dirs.static, dirs.onnx):
        write_manifest(sub, "export", cfg.to_dict(), data.labels, data.vocab_sha256,
                       {"parity_max_abs_diff": diffs, **manifest.get("metrics", {})},
                       inputs={manifest["stage"]: manifest}, **job.plan.record(),
                       parameters=count_parameters(model), architecture=model.config.model_type,
                       **({"onnx": onnx_meta} if sub == dirs.onnx else {}))


def report_export(out_dir, reference_name, diffs, onnx_meta):
    """The export's one console line; a refused INT8 copy is raised, to be warned about (pipeline) or to fail the
    export tool, after the line."""
    fusion, int8 = onnx_meta["fusion"], onnx_meta["int8"]
    worst = max([*diffs.values(), fusion.get("parity_max_abs_diff", 0.0)])
    log.info("%s: %s within %.1e of the %s; INT8 %s", out_dir,
             "dynamic, static, ONNX (fused)" if fusion["file"] else "dynamic, static, ONNX (not fused)", worst,
             reference_name, int8_summary(int8))
    if int8 and int8["refused"]:
        raise Int8Refused(int8["refused"])


def export_width(cfg, data, ofa_dir, out_dir, width):
    source = layout.require_trained_width(ofa_dir, width)
    return export_plan(cfg, data, source, out_dir, width_plan(load_config(source, "ofa"), width))


def export_plan(cfg, data, source, out_dir, plan):
    """The sub-model ``plan`` cuts from the supernet weights in ``source`` (a trained ``ofa/width_W``; a
    uniform width or per-layer counts), exported to ``out_dir`` with parity against the supernet at ``plan``."""
    manifest = read_manifest(source, "ofa")
    check_same_inputs(manifest, data.labels, data.vocab_sha256, source)
    ofa_model, state = load_supernet_width(source)
    set_plan(ofa_model, plan)
    model = build_sub_model(source, plan, state)
    name = f"width {plan.requested}" if plan.requested is not None else f"heads {list(plan.layer_heads)}"
    return write_export(cfg, data, ExportJob(model, plan, manifest, f"supernet at {name}", ofa_logits(ofa_model)),
                        out_dir)


def export_full_width(cfg, data, teacher_dir, out_dir, stage="teacher"):
    """The teacher, or a student (same format, ``stage="student"``), at full width."""
    manifest = read_manifest(teacher_dir, stage)
    check_same_inputs(manifest, data.labels, data.vocab_sha256, teacher_dir)
    teacher = load_pretrained(model_class_for(teacher_dir, stage), teacher_dir, flag=stage)
    teacher.eval()
    state = {k: v.numpy() for k, v in teacher.state_dict().items()}
    plan = plan_of(teacher.config)
    model = build_sub_model(teacher_dir, plan, state)
    return write_export(cfg, data, ExportJob(model, plan, manifest, stage, partial(numpy_logits, teacher)), out_dir)
