"""Depth/hidden distillation: a shallower or narrower BERT learns from the teacher.

The student is the teacher's family's NER class (``DIR/student/`` has the teacher's format).
With the teacher's hidden size it starts from the teacher's embeddings, classifier and every k-th
layer (``matches.layer_map``); the objective is the ``intermediate_matches`` list plus soft
cross-entropy on the logits and an optional hard-label term. Projections for hidden states of
another size live beside the student in ``StudentWithProjections``: they are checkpointed (resume
is exact) but never saved with the student.
"""
import logging

import paddle
from paddle import nn
from ner_compress.core import parallel
from ner_compress.models.families import FAMILIES
from ner_compress.compress.distill_losses import (FeatureRecorder, LabelWeights, backward_parts, label_parts,
                                                  real_token_mask)
from ner_compress.core.errors import UserError
from ner_compress.compress.matches import layer_map, match_parts, parse_matches
from ner_compress.models.modeling import count_parameters
from ner_compress.models.width_plan import without_plan
from ner_compress.compress.reconstruction_stage import refit
from ner_compress.compress.training import (Stage, best_model_eval, best_of, frozen_copy, global_token_count,
                                            run_stage, set_seed)

log = logging.getLogger("ner_compress")
SIZE_FLAGS = {"num_hidden_layers": "student_num_layers", "hidden_size": "student_hidden_size",
              "num_attention_heads": "student_num_attention_heads",
              "intermediate_size": "student_intermediate_size"}


def student_config(cfg, teacher_config):
    """The teacher's config with the ``student_*`` sizes that are set (None keeps the teacher's)."""
    config = without_plan(teacher_config)
    for key, flag in SIZE_FLAGS.items():
        value = getattr(cfg, flag)
        if value is not None:
            if value < 1:
                raise UserError(f"--{flag} {value}: must be at least 1")
            setattr(config, key, value)
    if config.num_hidden_layers > teacher_config.num_hidden_layers:
        raise UserError(f"--student_num_layers {config.num_hidden_layers}: the teacher has only "
                        f"{teacher_config.num_hidden_layers} layers; a student is at most as deep")
    if config.hidden_size % config.num_attention_heads:
        raise UserError(f"--student_hidden_size {config.hidden_size} is not a multiple of "
                        f"--student_num_attention_heads {config.num_attention_heads}")
    config.hidden_dropout_prob = cfg.hidden_dropout_prob
    config.attention_probs_dropout_prob = cfg.attention_probs_dropout_prob
    return config


def student_plan(cfg, teacher_config):
    """Student config and matches, checked before any data is read."""
    config = student_config(cfg, teacher_config)
    matches = parse_matches(cfg.intermediate_matches, config.num_hidden_layers,
                            teacher_config.num_hidden_layers, cfg.lambda_distill)
    return config, matches


def _same_layer_shape(a, b):
    return all(getattr(a, k) == getattr(b, k) for k in ("hidden_size", "num_attention_heads", "intermediate_size"))


def init_from_teacher(student, teacher):
    """Copy embeddings, pooler and classifier (same hidden size) and every k-th encoder layer (same
    layer shape) from the teacher. Returns the teacher layers copied, 0-based ([] if none)."""
    s, t = student.config, teacher.config
    if s.hidden_size != t.hidden_size:
        log.info("student: hidden size %d != teacher's %d: random initialisation", s.hidden_size, t.hidden_size)
        return []
    layers = layer_map(s.num_hidden_layers, t.num_hidden_layers) if _same_layer_shape(s, t) else []
    prefix = f"{teacher.base_model_prefix}.encoder.layers."
    state = {}
    for key, value in teacher.state_dict().items():
        if not key.startswith(prefix):
            state[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        for i, j in enumerate(layers):
            if j == int(index):
                state[f"{prefix}{i}.{rest}"] = value
    student.set_state_dict(state)
    log.info("student: initialised from the teacher's embeddings and classifier%s",
             f" and layers {layers} (0-based) of {t.num_hidden_layers}" if layers else
             " (layer shape differs: random encoder layers)")
    return layers


class StudentWithProjections(nn.Layer):
    """What the student stage trains and checkpoints: the student, and one projection per hidden
    match whose sizes differ (keyed by the match's name)."""

    def __init__(self, student, matches, teacher_hidden):
        super().__init__()
        self.student = student
        hidden = student.config.hidden_size
        self.projections = nn.LayerDict({m.name: nn.Linear(hidden, teacher_hidden) for m in matches
                                         if m.feature == "hidden" and hidden != teacher_hidden})


class StudentDistiller:
    """Teacher copy in eval (once per step under ``no_grad``), the trainable student and its objective: the
    logit terms and the ``matches`` between their recorded features."""

    def __init__(self, teacher, student, matches, cfg):
        self.teacher = frozen_copy(teacher)
        self.model = StudentWithProjections(student, matches, teacher.config.hidden_size)
        self.matches = matches
        self.weights = LabelWeights(cfg.student_lambda_logit, cfg.student_hard_label_weight, cfg.student_temperature)
        self.teacher_features = FeatureRecorder(self.teacher)
        self.student_features = FeatureRecorder(student)
        self.attentions = any(m.feature == "attention" for m in matches)

    def _logits(self, model, batch):
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    output_attentions=self.attentions, return_dict=True)
        return out.logits

    def step(self, batch):
        """Forward and backward; every loss is a mean over the real characters of the global batch."""
        labels = batch["labels"]
        tokens = global_token_count(labels)
        with paddle.no_grad():
            teacher_logits = self._logits(self.teacher, batch)
        student_logits = self._logits(self.model.student, batch)
        parts = label_parts(self.weights, student_logits, teacher_logits, labels, tokens)
        parts.update(match_parts(self.matches, self.student_features, self.teacher_features, real_token_mask(labels),
                                 tokens, self.model.projections))
        return backward_parts(parts)


def train_student(cfg, data, teacher, teacher_manifest, out_dir, checkpoint_root):
    """Distil ``teacher`` into the configured student; the best dev-F1 student is (re)written to ``out_dir``."""
    config, matches = student_plan(cfg, teacher.config)
    teacher.eval()
    set_seed(cfg.seed)
    student = FAMILIES[config.model_type][1](config)
    layers = init_from_teacher(student, teacher)
    distiller = StudentDistiller(teacher, student, matches, cfg)
    log.info("student: %d layers x %d hidden, %d heads, FFN %d: %d parameters (teacher %d), %d projection(s); "
             "matches %s", config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
             config.intermediate_size, count_parameters(student), count_parameters(teacher),
             len(distiller.model.projections), [m.name for m in matches])
    start = {}  # the refit of the start, filled in before training and recorded in the manifest
    eval_fn = best_model_eval("student", student, data, cfg, out_dir, inputs={"teacher": teacher_manifest},
                              init_teacher_layers=layers, matches=[vars(m) for m in matches],
                              start_reconstruction=start)

    def refit_start(resuming):
        # teacher layers stacked with gaps compute little of use (dev F1 0 on the default run); refit against
        # the layers they stand for, they start near the teacher (on rank 0: train_loop broadcasts its weights)
        if layers and not resuming and not cfg.skip_reconstruction and parallel.is_writer():
            start.update(refit(cfg, data, student, distiller.teacher))
            log.info("student: start refit against teacher layers %s (%.0f CPU-s)", layers, start["cpu_seconds"])

    state = run_stage(cfg, Stage(
        name="student", model=distiller.model, data=data, schedule=cfg.schedule("student"),
        step_fn=distiller.step, eval_fn=eval_fn, checkpoint_root=checkpoint_root, before_training=refit_start))
    return best_of("student", state, out_dir)
