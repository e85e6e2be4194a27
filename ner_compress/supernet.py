"""Once-for-all width supernet: convert the teacher, reorder by importance, distil at every width.

The OFA forwards come from ``paddlenlp.transformers.ofa_utils`` (scaled attention, head
masks) and ``trainer_compress.auto_model_dynabert_forward`` (the BERT forward OFA needs).
They are bound per instance, never on the classes, so the teacher's class and the exported
sub-model keep the stock PaddleNLP forwards. PaddleSlim's ``nlp_utils`` is never imported: it
patches the classes with an attention that drops the 1/sqrt(head_dim) scale.
"""
import copy
import logging
import os
import shutil
import types
from contextlib import contextmanager

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddlenlp.trainer.trainer_compress import auto_model_dynabert_forward, check_dynabert_config
from paddlenlp.transformers import BertModel
from paddlenlp.transformers.ofa_utils import (
    compute_neuron_head_importance,
    encoder_layer_ofa_forward,
    encoder_ofa_forward,
    mha_ofa_forward,
    prepare_qkv_ofa,
    reorder_neuron_head,
)
from paddleslim.nas.ofa import OFA, DistillConfig, utils
from paddleslim.nas.ofa.convert_super import Convert, supernet

from . import compat, parallel
from .artifacts import atomic_dir, write_manifest
from .data import IGNORE_INDEX, collate
from .checkpoint import Checkpointer, resume_path, save_weights
from .training import (count_batches, evaluate, global_token_count, make_optimizer, to_tensors, token_loss,
                       total_steps, train_loop)

log = logging.getLogger("ner_compress")

SUPERNET_WEIGHTS = "supernet.safetensors"
# instance attribute -> replacement, per layer class
_OFA_FORWARDS = (
    (nn.MultiHeadAttention, {"forward": mha_ofa_forward, "_prepare_qkv": prepare_qkv_ofa}),
    (nn.TransformerEncoderLayer, {"forward": encoder_layer_ofa_forward}),
    (nn.TransformerEncoder, {"forward": encoder_ofa_forward}),
    (BertModel, {"forward": auto_model_dynabert_forward}),
)


def bind_ofa_forwards(model):
    """Give every matching sublayer of ``model`` the OFA forward, on that instance only."""
    for layer in model.sublayers(include_self=True):
        for cls, methods in _OFA_FORWARDS:
            if isinstance(layer, cls):
                for name, fn in methods.items():
                    object.__setattr__(layer, name, types.MethodType(fn, layer))
    return model


def unbind_ofa_forwards(model):
    """Back to the class forwards (the instance attributes simply go away)."""
    for layer in model.sublayers(include_self=True):
        for name in ("forward", "_prepare_qkv"):
            layer.__dict__.pop(name, None)
    return model


def to_supernet(model):
    """``Convert(supernet(...))`` of ``model`` carrying its weights, with OFA forwards bound."""
    compat.apply_patches()
    weights = model.state_dict()
    converted = Convert(supernet(expand_ratio=[1.0])).convert(model)
    utils.set_state_dict(converted, weights)
    return bind_ofa_forwards(converted)


def mapping_layers(model):
    prefix = model.base_model_prefix
    return [f"{prefix}.embeddings"] + [f"{prefix}.encoder.layers.{i}"
                                       for i in range(model.config.num_hidden_layers)]


def build_ofa(teacher, lambda_distill):
    """OFA supernet of a copy of ``teacher``, distilling from ``teacher`` (hidden states hooked)."""
    teacher_copy = bind_ofa_forwards(copy.deepcopy(teacher))
    student = to_supernet(copy.deepcopy(teacher))
    distill = DistillConfig(lambda_distill=lambda_distill, teacher_model=teacher_copy,
                            mapping_layers=mapping_layers(student))
    return OFA(student, distill_config=distill, elastic_order=["width"])


def set_width(ofa_model, width_mult):
    config = check_dynabert_config(utils.dynabert_config(ofa_model, width_mult), width_mult)
    ofa_model.set_net_config(config)
    return config


@contextmanager
def student_only(ofa_model):
    """Skip the teacher's forward (evaluation needs the student alone)."""
    saved = ofa_model._add_teacher
    ofa_model._add_teacher = False
    try:
        yield ofa_model
    finally:
        ofa_model._add_teacher = saved


def ofa_inputs(batch):
    return {"input_ids": batch["input_ids"], "token_type_ids": batch["token_type_ids"],
            "attention_mask": [None, None]}


def ofa_logits(ofa_model):
    """The student at its current width as ``fn(input_ids, token_type_ids) -> numpy logits``."""
    def fn(input_ids, token_type_ids):
        with paddle.no_grad(), student_only(ofa_model):
            return ofa_model(**ofa_inputs({"input_ids": paddle.to_tensor(input_ids),
                                           "token_type_ids": paddle.to_tensor(token_type_ids)})).numpy()
    return fn


def importance_batches(windows, batch_size, limit, pad_id, seed=0):
    """``limit`` batches (None: all) of windows drawn at random (seeded) from the whole dev set,
    so importance sees sentences of every length, not only the shortest."""
    order = np.random.RandomState(seed).permutation(len(windows))[: limit * batch_size if limit else None]
    return [to_tensors(collate([windows[i] for i in order[j: j + batch_size]], pad_id))
            for j in range(0, len(order), batch_size)]


def reorder_by_importance(model, batches):
    """Sort heads and FFN neurons of every layer by importance (DynaBERT) so width slices keep the best."""
    head_importance, neuron_importance = compute_neuron_head_importance(
        model=model, data_loader=[dict(b) for b in batches], loss_fct=token_loss,
        num_layers=model.config.num_hidden_layers, num_heads=model.config.num_attention_heads)
    reorder_neuron_head(model, head_importance, neuron_importance)
    model.clear_gradients()
    return head_importance, neuron_importance


def soft_cross_entropy_sum(student_logits, teacher_logits, labels):
    """Cross-entropy to the teacher's distribution, summed over real characters only."""
    per_token = -(F.softmax(teacher_logits.detach(), axis=-1) * F.log_softmax(student_logits, axis=-1)).sum(-1)
    return (per_token * (labels != IGNORE_INDEX).astype(per_token.dtype)).sum()


def distill_step(ofa_model, batch, widths, lambda_logit):
    """Forward and backward at every width; {"w<width>_logit": .., "w<width>_hidden": ..} averaged
    over all ranks. The hidden-state loss is PaddleSlim's ``calc_distill_loss`` (MSE, hooks)."""
    tokens = global_token_count(batch["labels"])
    world = parallel.world_size()
    losses = {}
    for width in widths:
        set_width(ofa_model, width)
        student, teacher = ofa_model(**ofa_inputs(batch))
        rep_loss = ofa_model.calc_distill_loss()
        logit_sum = soft_cross_entropy_sum(student, teacher, batch["labels"])
        (rep_loss / world + lambda_logit * logit_sum / tokens).backward()
        losses[f"w{width}_logit"] = parallel.all_reduce_sum(float(logit_sum)) / tokens
        losses[f"w{width}_hidden"] = parallel.all_reduce_sum(float(rep_loss)) / world
    return losses


def width_dir(ofa_dir, width):
    return os.path.join(ofa_dir, f"width_{round(width, 4)}")


def save_width(ofa_model, teacher, data, cfg, width, metrics, teacher_manifest, ofa_dir):
    if not parallel.is_writer():
        return
    with atomic_dir(width_dir(ofa_dir, width)) as tmp:
        save_weights(ofa_model.model.state_dict(), os.path.join(tmp, SUPERNET_WEIGHTS))
        teacher.config.save_pretrained(tmp)
        shutil.copyfile(data.vocab_file, os.path.join(tmp, "vocab.txt"))
        write_manifest(tmp, "ofa", cfg.to_dict(), data.labels, data.vocab_sha256, metrics,
                       inputs={"teacher": teacher_manifest}, width_mult=width)


def distill(cfg, data, teacher, teacher_manifest, ofa_dir, checkpoint_root):
    """Train the supernet at every width each step; keep the best dev-F1 weights per width."""
    teacher.eval()
    ofa_model = build_ofa(teacher, cfg.lambda_distill)
    dev_w, train_w = data.windows("dev"), data.windows("train")
    checkpointer = Checkpointer(checkpoint_root, cfg.save_total_limit, writer=parallel.is_writer())
    if resume_path(cfg, checkpointer) is None and parallel.is_writer():
        # once, on rank 0; train_loop then broadcasts rank 0's (reordered) weights to every rank
        log.info("ofa: computing head and neuron importance on dev")
        reorder_by_importance(ofa_model.model, importance_batches(
            dev_w, cfg.per_device_eval_batch_size, cfg.importance_batches, data.encoder.pad_id, cfg.seed))
    steps_per_epoch = count_batches(train_w, cfg.per_device_train_batch_size)
    steps = total_steps(cfg.ofa_max_steps, cfg.ofa_num_train_epochs, steps_per_epoch)
    optimizer, scheduler = make_optimizer(ofa_model.model.parameters(), ofa_model.model.named_parameters(),
                                          cfg.ofa_learning_rate, cfg.weight_decay, cfg.warmup_ratio, steps)
    widths = sorted(cfg.width_mult_list, reverse=True)

    def eval_fn(step, state):
        for width in widths:
            set_width(ofa_model, width)
            scores = evaluate(ofa_logits(ofa_model), data, dev_w, cfg.per_device_eval_batch_size, cfg.decoding)
            log.info("ofa step %d width %s dev F1 %.4f", step, width, scores["f1"])
            key = str(width)
            if scores["f1"] > state["best"].get(key, {}).get("dev_f1", -1.0):
                state["best"][key] = {"dev_f1": scores["f1"], "dev": scores, "step": step}
                save_width(ofa_model, teacher, data, cfg, width, state["best"][key], teacher_manifest, ofa_dir)

    state = train_loop("ofa", cfg, ofa_model.model, optimizer, scheduler, train_w, steps, cfg.ofa_eval_steps,
                       lambda batch: distill_step(ofa_model, batch, widths, cfg.lambda_logit), eval_fn, checkpointer,
                       data.encoder.pad_id)
    return {float(k): v for k, v in state["best"].items()}, state["history"]
