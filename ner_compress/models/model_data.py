"""The corpus as a model reads it: the model's own vocabulary and lookup rule, then the windows encoded with them.

A pretrained model's ids only mean something with its own vocabulary (ERNIE's differs from BERT's, the e5
teacher's is XLM-R's), so a local ``--model_name_or_path`` directory's ``vocab.txt`` wins over the default.
"""
import os

from ner_compress.core import resources
from ner_compress.data.corpus import ner_data
from ner_compress.models.e5_pretrained import resolve_model_path


def model_vocab(cfg):
    """The vocabulary of a local ``--model_name_or_path`` directory, if it has one."""
    if not cfg.model_name_or_path:
        return None
    source = resolve_model_path(cfg.model_name_or_path, cfg.cache_dir)
    if os.path.isdir(source):
        path = os.path.join(source, "vocab.txt")
        return path if os.path.isfile(path) else None
    if cfg.model_type == "bert":
        return None  # bert-base-chinese's vocabulary is the default one
    return _hub_vocab(cfg)


def _hub_vocab(cfg):  # pragma: no cover - needs internet (the GPU recipes)
    from paddlenlp.transformers import AutoTokenizer

    directory = os.path.join(resources.cache_dir(cfg.cache_dir), "tokenizers", cfg.model_name_or_path)
    AutoTokenizer.from_pretrained(cfg.model_name_or_path).save_pretrained(directory)
    return os.path.join(directory, "vocab.txt")


def prepare_data(cfg):
    """Splits, labels, vocabulary and encoder for ``cfg``: ``--vocab_file``, else the model's, else the default."""
    return ner_data(cfg, cfg.vocab_file or model_vocab(cfg))
