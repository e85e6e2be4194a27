"""The encoder families every stage takes: BERT, ERNIE 3.0, RoBERTa and ELECTRA.

RoBERTa-wwm-ext and MacBERT ship as BERT-shaped checkpoints and load as ``bert``. Each family
gets one NER class: PaddleNLP's ``XForTokenClassification`` plus the encoder options our configs
record (a ``WidthPlan``: the heads and neurons each layer keeps; ``normalize_before``:
pre-LN; ``local_conv_kernel``: a convolution after the embeddings). The family is the config's
``model_type``, recorded in every manifest, so a later stage rebuilds the same class and never
assumes BERT.
"""
import json
import os
import types

from paddlenlp.transformers import (BertConfig, BertForTokenClassification, BertTokenizer, ElectraConfig,
                                    ElectraForTokenClassification, ElectraTokenizer, ErnieConfig,
                                    ErnieForTokenClassification, ErnieTokenizer, RobertaChineseTokenizer,
                                    RobertaConfig, RobertaForTokenClassification)

from ner_compress.core.errors import UserError
from ner_compress.models.encoder_changes import configure_encoder
from ner_compress.models.width_plan import plan_of, recorded


def _ner_class(base):
    """``Pruned<Base>(config, plan=None)``: ``base`` whose ``__init__`` then applies ``configure_encoder``,
    cut to ``plan`` (None: the plan ``config`` records, as ``from_pretrained`` builds it). The model's
    config records the plan, so ``save_pretrained`` writes its shape."""
    def body(namespace):
        def __init__(self, config, plan=None):
            plan = plan_of(config) if plan is None else plan
            config = recorded(config, plan)
            base.__init__(self, config)
            configure_encoder(self, config, plan)
        namespace.update({"__init__": __init__, "__module__": __name__})
    return types.new_class(f"Pruned{base.__name__}", (base,), exec_body=body)


PrunedBertForTokenClassification = _ner_class(BertForTokenClassification)
PrunedErnieForTokenClassification = _ner_class(ErnieForTokenClassification)
PrunedRobertaForTokenClassification = _ner_class(RobertaForTokenClassification)
PrunedElectraForTokenClassification = _ner_class(ElectraForTokenClassification)


# model_type -> (config class, NER class, tokenizer class saved beside the weights)
FAMILIES = {
    "bert": (BertConfig, PrunedBertForTokenClassification, BertTokenizer),
    "ernie": (ErnieConfig, PrunedErnieForTokenClassification, ErnieTokenizer),
    "roberta": (RobertaConfig, PrunedRobertaForTokenClassification, RobertaChineseTokenizer),
    "electra": (ElectraConfig, PrunedElectraForTokenClassification, ElectraTokenizer),
}


def family(model_type, flag="--model_type"):
    if model_type not in FAMILIES:
        raise UserError(f"{flag} {model_type}: unsupported architecture; use one of {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def model_type_of(directory, flag="--model_name_or_path"):
    """The ``model_type`` a saved model directory's config.json records."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {directory}: no config.json in that directory")
    with open(path, encoding="utf-8") as fh:
        model_type = json.load(fh).get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{flag} {directory}: architecture {model_type!r} is not supported; "
                        f"use one of {', '.join(FAMILIES)}")
    return model_type


def load_config(directory, flag="--model_name_or_path"):
    return FAMILIES[model_type_of(directory, flag)][0].from_pretrained(directory)


def model_class_for(directory, flag="--model_name_or_path"):
    return FAMILIES[model_type_of(directory, flag)][1]


def save_tokenizer(model, vocab_file, directory):
    """The family's own tokenizer over the vocabulary the characters were mapped with, its special
    tokens named as the lookup rule names them, and the rule itself beside it."""
    from ner_compress.data.vocab import copy_vocab, load_lookup

    specials = (load_lookup(vocab_file) or {}).get("special_tokens", {})
    names = {f"{role}_token": token for role, token in specials.items()}
    FAMILIES[model.config.model_type][2](vocab_file, **names).save_pretrained(directory)
    copy_vocab(vocab_file, directory)  # the exact file the ids came from, whatever the tokenizer writes
