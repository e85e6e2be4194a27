"""Once-for-all width supernet: convert the teacher, reorder by importance, distil at every width.

Distillation (``WidthDistiller``): the teacher runs once per step under ``no_grad``; every width
matches its hidden states (masked MSE over real characters) and its soft labels. Widths are cut
by ``width_plan`` (whole heads). The OFA forwards come from ``paddlenlp.transformers.ofa_utils`` (scaled attention, head
masks) and ``trainer_compress.auto_model_dynabert_forward`` (the BERT forward OFA needs).
They are bound per instance, never on the classes, so the teacher's class and the exported
sub-model keep the stock PaddleNLP forwards. PaddleSlim's ``nlp_utils`` is never imported: it
patches the classes with an attention that drops the 1/sqrt(head_dim) scale.
"""
import copy
import logging
import os
import re
import types

import numpy as np
import paddle
from paddle import nn
from paddlenlp.trainer.trainer_compress import auto_model_dynabert_forward
from paddlenlp.transformers.ofa_utils import (
    compute_neuron_head_importance,
    encoder_layer_ofa_forward,
    encoder_ofa_forward,
    mha_ofa_forward,
    reorder_neuron_head,
)
from paddleslim.nas.ofa import OFA, utils
from paddleslim.nas.ofa.convert_super import Convert, supernet

from ner_compress.core import compat, layout, parallel, runtime
from ner_compress.core.artifacts import atomic_dir, write_manifest
from ner_compress.core.checkpoint import save_weights
from ner_compress.core.console import detail
from ner_compress.data.corpus import collate
from ner_compress.compress.distill_losses import (FeatureRecorder, LabelWeights, backward_parts, label_parts,
                                                  real_token_mask)
from ner_compress.compress.matches import default_matches, match_parts
from ner_compress.models.width_plan import width_plan
from ner_compress.data.vocab import copy_vocab
from ner_compress.compress.training import (Stage, evaluate, frozen_copy, global_token_count, run_stage, to_tensors,
                                            token_loss)

log = logging.getLogger("ner_compress")

SUPERNET_WEIGHTS = "supernet.safetensors"


def prepare_qkv_whole_heads(self, query, key, value, cache=None):
    """``prepare_qkv_ofa`` of paddlenlp 2.8.1 with the head count read from the projection's width.

    Upstream scales ``num_heads`` by the expand ratio and divides it back after the forward:
    ``int(12 * 0.8333) = 9`` heads against 639 projection columns, and ``int(8 / 0.6667) = 11``
    heads at the next full-width step. Cut by ``width_plan``, the projection holds
    whole heads, so its width says how many. Encoder self-attention only (no cache).
    """
    q = self.q_proj(query)
    self.num_heads = q.shape[-1] // self.head_dim  # compute_kv reshapes k and v with it
    q = paddle.transpose(paddle.reshape(q, [0, 0, self.num_heads, self.head_dim]), perm=[0, 2, 1, 3])
    k, v = self.compute_kv(key, value)
    return q, k, v


# instance attribute -> replacement, per layer class
_OFA_FORWARDS = (
    (nn.MultiHeadAttention, {"forward": mha_ofa_forward, "_prepare_qkv": prepare_qkv_whole_heads}),
    (nn.TransformerEncoderLayer, {"forward": encoder_layer_ofa_forward}),
    (nn.TransformerEncoder, {"forward": encoder_ofa_forward}),
)


def bind_ofa_forwards(model):
    """Give every matching sublayer of ``model`` the OFA forward, on that instance only; the encoder
    model of any family (BERT, ERNIE, RoBERTa, ELECTRA) gets PaddleNLP's generic DynaBERT forward."""
    for layer in model.sublayers(include_self=True):
        for cls, methods in _OFA_FORWARDS:
            if isinstance(layer, cls):
                for name, fn in methods.items():
                    object.__setattr__(layer, name, types.MethodType(fn, layer))
    base = model.base_model
    forward = auto_model_dynabert_forward
    if getattr(base, "pooler", None) is None:  # ELECTRA; RoBERTa built for tokens has pooler = None
        if hasattr(base, "pooler"):
            base.pooler = nn.Identity()  # the generic forward calls it; parameter-free, so no weight changes
        forward = sequence_only_dynabert_forward
    object.__setattr__(base, "forward", types.MethodType(forward, base))
    return model


def sequence_only_dynabert_forward(self, *args, **kwargs):
    """For encoders without a pooler: the generic forward returns (sequence, pooled); ELECTRA's and
    RoBERTa's token classifiers take a 1-tuple, but would pass a pooled output on as a second output."""
    return auto_model_dynabert_forward(self, *args, **kwargs)[:1]


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


class WidthDistiller:
    """The supernet (OFA, width only) of a copy of ``teacher``, and a frozen teacher copy in eval mode.

    The teacher runs once per step under ``no_grad``; its hidden states and logits are reused at
    every width (PaddleSlim's ``DistillConfig`` would rerun it per width with autograd on, and its
    MSE covers padding). Hidden states (the embeddings and every layer) are matched over real characters.
    """

    def __init__(self, teacher, lambda_distill, lambda_logit, lambda_hard=0.0):
        self.teacher = frozen_copy(teacher)
        self.ofa_model = OFA(to_supernet(copy.deepcopy(teacher)), elastic_order=["width"])
        self.config = teacher.config
        self.lambda_distill = lambda_distill
        self.weights = LabelWeights(lambda_logit, lambda_hard)
        layers = teacher.config.num_hidden_layers
        self.matches = default_matches(layers, layers, 1.0)  # each layer with itself
        self.teacher_features = FeatureRecorder(self.teacher)
        self.student_features = FeatureRecorder(self.ofa_model.model)

    @property
    def student(self):
        return self.ofa_model.model

    def step(self, batch, widths):
        """Forward and backward at every width; {"w<width>_logit": .., "w<width>_hidden": .., ...}, means
        over the real characters of the global batch (all ranks); hidden: the sum over layers."""
        tokens = global_token_count(batch["labels"])
        mask = real_token_mask(batch["labels"])
        with paddle.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        losses = {}
        for width in widths:
            set_width(self.ofa_model, width)
            student_logits = self.ofa_model(**ofa_inputs(batch))
            parts = label_parts(self.weights, student_logits, teacher_logits, batch["labels"], tokens)
            layers = match_parts(self.matches, self.student_features, self.teacher_features, mask, tokens)
            parts["hidden"] = (self.lambda_distill, paddle.add_n([loss for _, loss in layers.values()]))
            losses.update({f"w{width}_{name}": value for name, value in backward_parts(parts).items()})
        return losses


def net_config(ofa_model, plan):
    """OFA's per-layer config for a ``WidthPlan``: each layer's whole heads in q/k/v, its neurons in the first
    FFN layer, everything else at full size (by channel count, not a ratio a float can round)."""
    config = utils.dynabert_config(ofa_model, 1.0)
    widths = plan.attention_widths()
    for key in config:
        layer = re.search(r"\.layers\.(\d+)\.", key)  # which encoder layer's plan cuts this sublayer
        if layer and any(name in key for name in ("q_proj", "k_proj", "v_proj")):
            config[key] = {"channel": widths[int(layer.group(1))]}
        elif layer and "linear1" in key:
            config[key] = {"channel": plan.layer_neurons[int(layer.group(1))]}
        else:
            config[key] = {"expand_ratio": 1.0}
    return config


def set_width(ofa_model, width):
    return set_plan(ofa_model, width_plan(ofa_model.model.config, width))


def set_plan(ofa_model, plan):
    """The supernet at ``plan`` (a uniform width or per-layer counts); returns the plan."""
    ofa_model.set_net_config(net_config(ofa_model, plan))
    return plan


def ofa_inputs(batch):
    return {"input_ids": batch["input_ids"], "token_type_ids": batch["token_type_ids"],
            "attention_mask": [None, None]}


def ofa_logits(ofa_model):
    """The student at its current width as ``fn(input_ids, token_type_ids) -> numpy logits``."""
    def fn(input_ids, token_type_ids):
        with paddle.no_grad():
            return ofa_model(**ofa_inputs({"input_ids": paddle.to_tensor(input_ids),
                                           "token_type_ids": paddle.to_tensor(token_type_ids)})).numpy()
    return fn


def importance_batches(windows, batch_size, limit, pad_id, seed=0):
    """``limit`` batches (None: all) of training windows drawn at random (seeded), so importance sees
    sentences of every length, not only the shortest, and dev stays for choosing."""
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


def plan_record(plan):
    """How a width was cut, for manifests: the requested ratio and what it kept."""
    return {"width_mult": plan.requested, "effective_width_mult": plan.effective, "heads": plan.heads,
            "num_heads": plan.num_heads, "ffn_neurons": plan.neurons}


def width_plans(config, widths):
    """Every width's plan before any training: a width that keeps no head is refused here."""
    plans = {w: width_plan(config, w) for w in widths}
    for w, plan in plans.items():
        if abs(plan.effective - w) > 1e-9:
            log.info("ofa: width %s snapped to %d of %d heads (effective width %.4f), %d FFN neurons",
                     w, plan.heads, plan.num_heads, plan.effective, plan.neurons)
    return plans


def save_width(ofa_model, teacher, data, cfg, width, metrics, teacher_manifest, ofa_dir):
    if not parallel.is_writer():
        return
    with atomic_dir(layout.width_dir(ofa_dir, width)) as tmp:
        save_weights(ofa_model.model.state_dict(), os.path.join(tmp, SUPERNET_WEIGHTS))
        teacher.config.save_pretrained(tmp)
        copy_vocab(data.vocab_file, tmp)
        write_manifest(tmp, "ofa", cfg.to_dict(), data.labels, data.vocab_sha256, metrics,
                       inputs={"teacher": teacher_manifest}, speed=metrics.get("speed", {}), runtime=runtime.report(),
                       architecture=teacher.config.model_type,
                       **plan_record(width_plan(teacher.config, width)))


def trained_widths(cfg):
    """The widths trained each step: all of them with ``ofa_train_full_width``, else those below 1.0
    (width 1.0 is the source model itself, and distilling it into its own copy only moves it away)."""
    widths = sorted(cfg.width_mult_list, reverse=True)
    below = [w for w in widths if w < 1.0]
    return widths if cfg.ofa_train_full_width or not below else below


def train_supernet(cfg, data, teacher, teacher_manifest, ofa_dir, checkpoint_root):
    """Train the supernet's widths each step (``trained_widths``); keep the best dev-F1 weights per width,
    every width scored at step 0 too."""
    teacher.eval()
    name = os.path.basename(os.path.normpath(ofa_dir))  # ofa or student_ofa: which supernet a log line is of
    widths = sorted(cfg.width_mult_list, reverse=True)
    trained = trained_widths(cfg)
    width_plans(teacher.config, widths)
    distiller = WidthDistiller(teacher, cfg.lambda_distill, cfg.lambda_logit, cfg.ofa_hard_label_weight)
    ofa_model = distiller.ofa_model
    dev_w = data.windows("dev")

    def reorder(resuming):
        if not resuming and parallel.is_writer():
            # once, on rank 0; train_loop then broadcasts rank 0's (reordered) weights to every rank
            detail.info("%s: computing head and neuron importance on training sentences", name)
            reorder_by_importance(ofa_model.model, importance_batches(
                data.windows("train"), cfg.per_device_eval_batch_size, cfg.importance_batches, data.encoder.pad_id,
                cfg.seed))

    def eval_fn(step, state):
        for width in (widths if step == 0 else trained):  # an untrained width only drifts with the shared weights
            set_width(ofa_model, width)
            scores = evaluate(ofa_logits(ofa_model), data, dev_w, cfg.per_device_eval_batch_size, cfg.decoding)
            detail.info("%s step %d width %s dev F1 %.4f", name, step, width, scores["f1"])
            key = str(width)
            if scores["f1"] > state["best"].get(key, {}).get("dev_f1", -1.0):
                state["best"][key] = {"dev_f1": scores["f1"], "dev": scores, "step": step,
                                      "speed": state.get("speed", {})}
                save_width(ofa_model, teacher, data, cfg, width, state["best"][key], teacher_manifest, ofa_dir)

    state = run_stage(cfg, Stage(
        name=name, model=ofa_model.model, data=data, schedule=cfg.schedule("ofa"),
        step_fn=lambda batch: distiller.step(batch, trained), eval_fn=eval_fn, checkpoint_root=checkpoint_root,
        before_training=reorder))
    return {float(k): v for k, v in state["best"].items()}, state["history"]
