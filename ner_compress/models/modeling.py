"""Building the teacher (fresh or from pretrained weights, safetensors unless pickles are allowed), slicing
supernet weights into a sub-model, and small helpers on a built model.

A sub-model is the family's NER class (``families``) cut to a ``WidthPlan`` (``encoder_changes``); its config
records the plan, so ``save_pretrained`` / ``from_pretrained`` round-trip an exported width.
"""
import os

import paddle

from ner_compress.core.errors import UserError
from ner_compress.models.e5_pretrained import resolve_model_path
from ner_compress.models.families import family, load_config, model_class_for
from ner_compress.models.width_plan import width_plan

SAFE_WEIGHTS = "model.safetensors"
PICKLED_WEIGHTS = "model_state.pdparams"


def check_model_options(cfg):
    """What the core config cannot check alone: the family exists, and a fresh model's widths keep whole
    heads (a pretrained teacher's head count is checked once it is loaded)."""
    family(cfg.model_type)
    if not cfg.model_name_or_path:
        for width in cfg.width_mult_list:
            width_plan(cfg, width)


def teacher_config(cfg, labels, vocab_size, pad_id):
    """A fresh model's config in the family ``cfg.model_type`` (ELECTRA: ``embedding_size`` may differ
    from the hidden size; ERNIE 3.0 style task-type embeddings with ``use_task_id``)."""
    config_class = family(cfg.model_type)[0]
    extra = {"embedding_size": cfg.embedding_size or cfg.hidden_size} if cfg.model_type == "electra" else {}
    if cfg.model_type == "ernie":
        extra = {"use_task_id": True, "task_type_vocab_size": 3}
    return config_class(
        **extra,
        vocab_size=vocab_size,
        pad_token_id=pad_id,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=max(512, cfg.max_seq_length),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        normalize_before=cfg.normalize_before,
        local_conv_kernel=cfg.local_conv_kernel,
    )


def load_pretrained(cls, name_or_dir, allow_pickle=False, flag="--model_name_or_path", **kwargs):
    """``cls.from_pretrained`` that reads safetensors, and pickled ``.pdparams`` only when allowed.

    Unpickling runs arbitrary code from the file, so a directory without ``model.safetensors``
    (or a hub name, whose PaddleNLP weights are pickled) needs ``--allow_pickle``.
    """
    local = os.path.isdir(name_or_dir)
    if local and not os.path.isfile(os.path.join(name_or_dir, SAFE_WEIGHTS)):
        if not os.path.isfile(os.path.join(name_or_dir, PICKLED_WEIGHTS)):
            raise UserError(f"{flag} {name_or_dir}: no {SAFE_WEIGHTS} or {PICKLED_WEIGHTS} in that directory")
        if not allow_pickle:
            raise UserError(f"{flag} {name_or_dir}: weights are pickled ({PICKLED_WEIGHTS}); pass --allow_pickle "
                            f"if you trust the source")
    elif not local and not allow_pickle:
        raise UserError(f"{flag} {name_or_dir}: hub weights are pickled .pdparams; pass --allow_pickle to "
                        f"download and load them, or give a local directory with {SAFE_WEIGHTS}")
    try:
        return cls.from_pretrained(name_or_dir, use_safetensors=local and not allow_pickle or None, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise UserError(f"{flag} {name_or_dir}: cannot load ({err})")


def check_checkpoint_labels(directory, labels):
    """A token-classification checkpoint trained on other labels is refused; a bare encoder (no
    labels, or PaddleNLP's placeholder LABEL_i) gets a fresh classifier for ours."""
    config = load_config(directory)
    names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
    if names and not all(str(n).startswith("LABEL_") for n in names) and names != list(labels):
        raise UserError(f"--model_name_or_path {directory}: its labels {names} differ from the data's {list(labels)}; "
                        f"fine-tune from its encoder instead (a checkpoint without id2label)")


def check_pretrained_layers(cfg, directory):
    layers = int(load_config(directory).num_hidden_layers)
    if cfg.pretrained_layers and cfg.pretrained_layers > layers:
        raise UserError(f"--pretrained_layers {cfg.pretrained_layers}: {directory} has only {layers} encoder layers; "
                        f"keep at most {layers}")


def build_teacher(cfg, labels, vocab_size, pad_id):
    """A fresh BERT from the config, or pretrained weights from a PaddleNLP name or directory.

    ``pad_id`` is the vocabulary's [PAD]: the attention mask is built from it."""
    if not cfg.model_name_or_path:
        return family(cfg.model_type)[1](teacher_config(cfg, labels, vocab_size, pad_id))
    source = resolve_model_path(cfg.model_name_or_path, cfg.cache_dir)
    local = os.path.isdir(source)
    if local:
        check_checkpoint_labels(source, labels)
        check_pretrained_layers(cfg, source)
    cls = model_class_for(source) if local else family(cfg.model_type)[1]
    kept = {"num_hidden_layers": cfg.pretrained_layers} if cfg.pretrained_layers else {}
    model = load_pretrained(cls, source, cfg.allow_pickle, **kept,  # layers past the first N are left unread
                            num_labels=len(labels), id2label=dict(enumerate(labels)),
                            label2id={label: i for i, label in enumerate(labels)},
                            ignore_mismatched_sizes=True)  # a placeholder classifier; real labels were checked
    if model.config.vocab_size != vocab_size:
        raise UserError(f"--model_name_or_path {cfg.model_name_or_path}: vocab size {model.config.vocab_size} "
                        f"differs from --vocab_file ({vocab_size}); use the model's own vocabulary")
    model.config.pad_token_id = pad_id
    model.base_model.pad_token_id = pad_id
    return model


def sub_model_state(supernet_state, sub_model):
    """Slice supernet weights (keys with ``.fn``) to the leading rows/columns the sub-model has.

    Heads and neurons were reordered by importance before distillation, so the leading
    slice is exactly what the supernet computes at that width.
    """
    target = sub_model.state_dict()
    sliced = {}
    for key, value in supernet_state.items():
        name = key.replace(".fn.", ".")
        if name not in target:
            raise UserError(f"supernet weight {key} has no place in the sub-model; was it made by another model?")
        shape = target[name].shape
        value = value.numpy() if isinstance(value, paddle.Tensor) else value
        sliced[name] = value[tuple(slice(0, d) for d in shape)]
        if list(sliced[name].shape) != list(shape):
            raise UserError(f"supernet weight {key} {list(value.shape)} is smaller than the sub-model's {shape}")
    missing = sorted(set(target) - set(sliced))
    if missing:
        raise UserError(f"supernet weights lack {missing[:3]}...; the ofa/ directory is incomplete")
    return sliced


def into_supernet_state(supernet_state, sub_state):
    """The inverse of ``sub_model_state``: ``supernet_state`` (numpy, keys with ``.fn.``) with the leading
    rows/columns replaced by the sub-model's weights, so a refit width is stored where export reads it."""
    merged = {}
    for key, value in supernet_state.items():
        part = sub_state[key.replace(".fn.", ".")]
        part = part.numpy() if isinstance(part, paddle.Tensor) else part
        merged[key] = value.copy()
        merged[key][tuple(slice(0, d) for d in part.shape)] = part
    return merged


def build_sub_model(source_dir, plan, state, flag="export"):
    """The family's NER class of ``source_dir``'s config cut to ``plan`` (a ``WidthPlan``; None: the config's
    own shape), holding the leading slice of ``state`` in every layer."""
    model = model_class_for(source_dir, flag)(load_config(source_dir, flag), plan=plan)
    model.set_state_dict(sub_model_state(state, model))
    model.eval()
    return model


def numpy_logits(model, input_ids, token_type_ids):
    """Logits of a dynamic-graph model for numpy ids, without building a backward graph."""
    with paddle.no_grad():
        return model(input_ids=paddle.to_tensor(input_ids), token_type_ids=paddle.to_tensor(token_type_ids)).numpy()


def count_parameters(model):
    return int(sum(p.numel().item() if hasattr(p.numel(), "item") else p.numel() for p in model.parameters()))
