"""Vocabulary pruning, a compression step of its own (as TextPruner's VocabularyPruner), before fine-tuning.

A pretrained model keeps a word-embedding row for every token of its vocabulary, and a Chinese NER
corpus uses few of them (bert-base-chinese: 21,128 rows; an XLM-R vocabulary: 250,002, most of the
model). Pruning keeps the rows of the characters of the training corpus (its train and dev
splits), of an optional ``--keep_chars_file``, and of the special tokens; new ids are the kept old
ones in order, gaps closed. Which row a character uses is the model directory's own lookup
(``vocab.CharEncoder.char_id``, built by ``prepare_data``), so on kept characters the pruned model
computes what the unpruned one does, and a dropped character gets ``[UNK]``'s row. Every other
tensor with a vocabulary axis (an MLM head's decoder weight or bias, tied or not) is cut to the
same rows, as TextPruner prunes the LM head, so the directory stays consistent for any head.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ner_compress.core import parallel
from ner_compress.models.families import model_type_of
from ner_compress.core.artifacts import MANIFEST, WEIGHT_SUFFIXES, atomic_dir, read_manifest, write_json, write_manifest
from ner_compress.models.model_data import prepare_data
from ner_compress.models.e5_pretrained import resolve_model_path
from ner_compress.core.errors import UserError
from ner_compress.models.modeling import SAFE_WEIGHTS
from ner_compress.core.resources import file_digest

log = logging.getLogger("ner_compress")
STAGE = "pruned_vocab"
PRUNED_DIR = "pruned_model"
VOCAB = "vocab.txt"
CONFIG = "config.json"
REWRITTEN = {VOCAB, CONFIG, SAFE_WEIGHTS, MANIFEST}
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# config sizes a vocabulary axis could be mistaken for: then which axis to cut is ambiguous
OTHER_SIZES = ("hidden_size", "embedding_size", "intermediate_size", "max_position_embeddings", "type_vocab_size",
               "task_type_vocab_size", "num_labels")


def pruned_config(cfg, out_dir):
    """The pipeline hook: prune ``--model_name_or_path`` into ``out_dir`` (or reuse it) and return
    the config that fine-tunes from there. Several processes: rank 0 prunes, the others wait."""
    source = local_source(cfg, cfg.model_name_or_path)
    if not (source and os.path.isdir(source)):
        raise UserError(f"--prune_vocab: needs --model_name_or_path DIR, a local model directory (got {source!r}); "
                        f"drop --prune_vocab for a model built from scratch or a hub name")
    if os.path.abspath(source) == os.path.abspath(out_dir):
        return cfg  # a later stage's inherited config already points at the pruned model
    if cfg.vocab_file:
        raise UserError(f"--vocab_file {cfg.vocab_file}: --prune_vocab takes the vocabulary of --model_name_or_path "
                        f"and writes its own; drop --vocab_file")
    if parallel.is_writer():
        prune(cfg, source, out_dir)
    parallel.barrier()
    return dataclasses.replace(cfg, model_name_or_path=out_dir)


def prune(cfg, source, out_dir):
    """Prune ``source`` to the characters of ``cfg``'s corpus into ``out_dir``; an ``out_dir`` already
    pruned from the same source (sha256) for the same characters is reused. Returns its manifest."""
    source = local_source(cfg, source)
    check_source(source)
    extra_chars = read_keep_chars(cfg.keep_chars_file)
    data = prepare_data(reading(cfg, source))
    corpus = {c for split in (data.splits.train, data.splits.dev) for s in split for c in s.chars}
    chars = corpus | extra_chars
    identity = {"source_sha256": directory_digest(source),
                "chars_sha256": hashlib.sha256("".join(sorted(chars)).encode("utf-8")).hexdigest()}
    manifest = finished(out_dir, identity)
    if manifest:
        log.info("vocabulary pruning: reusing %s (same source and characters)", out_dir)
        return manifest
    with atomic_dir(out_dir) as tmp:
        old_ids = kept_ids(source, data.encoder, chars)
        cut = write_pruned(source, tmp, old_ids)
        check_lookup(chars, data.encoder, directory_encoder(cfg, tmp), old_ids, tmp)
        manifest = write_manifest(tmp, STAGE, cfg.to_dict(), [], file_digest(os.path.join(tmp, VOCAB)),
                                  inputs={"source": source_manifest(source)}, **identity, **sizes(source, tmp),
                                  source_dir=os.path.abspath(source), old_ids=old_ids, cut_tensors=cut,
                                  characters=character_counts(cfg, data, corpus, extra_chars))
    rows = manifest["rows"]
    log.info("vocabulary pruning: kept %d of %d rows (%d dropped) -> %s", rows["kept"], rows["before"],
             rows["dropped"], out_dir)
    return manifest


def character_counts(cfg, data, corpus, extra_chars):
    """Distinct characters kept for the corpus and for the user's list, and how many have no row at all."""
    unknown = sum(data.encoder.char_id(c) == data.encoder.unk_id for c in corpus | extra_chars)
    return {"corpus": len(corpus), "corpus_sources": data.splits.sources, "keep_chars_file": cfg.keep_chars_file,
            "keep_chars": len(extra_chars), "unknown": unknown}


def local_source(cfg, name_or_path):
    """The directory a ``--model_name_or_path`` value means (multilingual-e5-small: its converted one)."""
    return resolve_model_path(name_or_path, cfg.cache_dir) if name_or_path else name_or_path


def reading(cfg, directory):
    """``cfg`` that makes ``prepare_data`` read ``directory``'s vocabulary and lookup rule."""
    return dataclasses.replace(cfg, model_name_or_path=directory, vocab_file=None)


def directory_encoder(cfg, directory):
    """The ``CharEncoder`` of a model directory, exactly as ``prepare_data`` builds it for training."""
    return prepare_data(reading(cfg, directory)).encoder


def check_source(directory):
    if not (directory and os.path.isdir(directory)):
        raise UserError(f"--model_name_or_path {directory}: not a local model directory; pruning needs one with "
                        f"config.json, {SAFE_WEIGHTS} and {VOCAB}")
    model_type_of(directory)  # config.json there, of a family we support
    hints = {VOCAB: "save the model with its tokenizer (tokenizer.save_pretrained)",
             SAFE_WEIGHTS: "save it with save_pretrained(..., safe_serialization=True)"}
    for name, hint in hints.items():
        if not os.path.isfile(os.path.join(directory, name)):
            raise UserError(f"--model_name_or_path {directory}: no {name} in that directory; {hint}")


def read_keep_chars(path):
    """Every character of a UTF-8 file except line breaks, tabs and ASCII spaces (as data files separate)."""
    if not path:
        return set()
    if not os.path.isfile(path):
        raise UserError(f"--keep_chars_file {path}: no such file; give a UTF-8 text file of the characters to keep")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        raise UserError(f"--keep_chars_file {path}: not valid UTF-8 (byte {err.start}); save it as UTF-8")
    return set(text) - set("\r\n\t ")


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def special_tokens(directory):
    """Tokens a tokenizer file of the directory names as special ([MASK] too), if it has one."""
    path = os.path.join(directory, SPECIAL_TOKENS_MAP)
    values = list(read_json(path).values()) if os.path.isfile(path) else []
    tokens = set()
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            tokens.add(item.get("content") if isinstance(item, dict) else item)
    return {t for t in tokens if isinstance(t, str)}


def kept_ids(source, encoder, chars):
    """Old ids to keep, in order: the rows ``chars`` look up, the encoder's specials, the special
    tokens the tokenizer files name, and every row the config refers to (``pad_token_id``, ...)."""
    config = read_json(os.path.join(source, CONFIG))
    ids = {encoder.char_id(c) for c in chars} | {encoder.unk_id, encoder.cls_id, encoder.sep_id, encoder.pad_id}
    ids |= {encoder.vocab[t] for t in special_tokens(source) if t in encoder.vocab}
    tokens = len(vocab_lines(source))
    ids |= {v for v in token_id_fields(config).values() if 0 <= v < tokens}
    return sorted(ids)


def token_id_fields(config):
    return {k: v for k, v in config.items() if k.endswith("_token_id") and isinstance(v, int)
            and not isinstance(v, bool)}


def vocab_lines(directory):
    """Line i is token i, read as ``vocab.load_vocab`` reads it."""
    with open(os.path.join(directory, VOCAB), encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


def write_pruned(source, tmp, old_ids):
    """vocab.txt, config.json and model.safetensors cut to ``old_ids``; every other file copied unchanged
    (a lookup-rule file among them), other weight files dropped (they hold the full table). Returns
    the names of the tensors cut."""
    new_id = {old: new for new, old in enumerate(old_ids)}
    config = read_json(os.path.join(source, CONFIG))
    rows = int(config["vocab_size"])
    copy_extras(source, tmp)
    lines = vocab_lines(source)
    if len(lines) > rows:
        raise UserError(f"{os.path.join(source, VOCAB)}: {len(lines)} tokens but config.json has vocab_size {rows}; "
                        f"use the model's own vocabulary")
    with open(os.path.join(tmp, VOCAB), "w", encoding="utf-8") as fh:
        fh.writelines(lines[i] + "\n" for i in old_ids)
    tensors, metadata = read_weights(source)
    cut = cut_vocab_axes(tensors, np.asarray(old_ids, dtype="int64"), vocab_axis_size(source, config, tensors))
    save_file(tensors, os.path.join(tmp, SAFE_WEIGHTS), metadata=metadata)
    config["vocab_size"] = len(old_ids)
    config.update({k: new_id[v] for k, v in token_id_fields(config).items() if v in new_id})
    write_json(os.path.join(tmp, CONFIG), config)
    return cut


def copy_extras(source, tmp):
    for rel in relative_files(source):
        if rel in REWRITTEN or rel.endswith(WEIGHT_SUFFIXES):
            continue
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        shutil.copy2(os.path.join(source, rel), os.path.join(tmp, rel))


def read_weights(directory):
    path = os.path.join(directory, SAFE_WEIGHTS)
    try:
        with safe_open(path, "np") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    except Exception as err:  # safetensors raises its own error types (header, dtype such as bf16)
        raise UserError(f"{path}: cannot read the weights ({err}); save them again with save_pretrained")


def vocab_axis_size(source, config, tensors):
    """The word-embedding table's rows, refused when a vocabulary axis would be ambiguous."""
    rows = int(config["vocab_size"])
    tables = [k for k, v in tensors.items() if k.endswith("word_embeddings.weight") and v.shape[0] == rows]
    if not tables:
        raise UserError(f"{os.path.join(source, SAFE_WEIGHTS)}: no word_embeddings.weight table of vocab_size {rows} "
                        f"rows; is config.json the model's own?")
    clashes = [k for k in OTHER_SIZES if config.get(k) == rows]
    if clashes:
        raise UserError(f"{os.path.join(source, CONFIG)}: vocab_size {rows} equals {clashes[0]}, so a table's "
                        f"vocabulary axis is ambiguous; this model cannot be pruned safely")
    return rows


def cut_vocab_axes(tensors, old_ids, rows):
    """Cut, in place, the vocabulary axis of every tensor that has one; the names cut."""
    cut = []
    for name, value in tensors.items():
        if rows in value.shape:
            tensors[name] = np.ascontiguousarray(np.take(value, old_ids, axis=value.shape.index(rows)))
            cut.append(name)
    return cut


def check_lookup(chars, old, new, old_ids, directory):
    """The pruned directory's lookup must give every kept character its old row, renumbered; a lookup
    rule that depended on which other tokens exist would break the equivalence."""
    new_id = {old_id: i for i, old_id in enumerate(old_ids)}
    pairs = [(repr(c), old.char_id(c), new.char_id(c)) for c in sorted(chars)]
    pairs += [(name, getattr(old, name), getattr(new, name)) for name in ("unk_id", "cls_id", "sep_id", "pad_id")]
    for what, before, after in pairs:
        if new_id.get(before) != after:
            raise UserError(f"{directory}: the character lookup resolves {what} to another row after pruning "
                            f"(old id {before}, new id {after}); its lookup rule cannot be pruned this way")


def relative_files(directory):
    for root, _, names in os.walk(directory):
        for name in names:
            yield os.path.relpath(os.path.join(root, name), directory)


def directory_digest(directory):
    """sha256 over every file's relative path and sha256: the source's identity for reuse."""
    digest = hashlib.sha256()
    for rel in sorted(relative_files(directory)):
        digest.update(f"{rel}\0{file_digest(os.path.join(directory, rel))}\n".encode("utf-8"))
    return digest.hexdigest()


def parameter_count(directory):
    with safe_open(os.path.join(directory, SAFE_WEIGHTS), "np") as fh:
        return int(sum(np.prod(fh.get_slice(k).get_shape(), dtype="int64") for k in fh.keys()))


def bytes_on_disk(directory):
    """All files but the manifest (which only the pruned directory has to have)."""
    return sum(os.path.getsize(os.path.join(directory, rel)) for rel in relative_files(directory) if rel != MANIFEST)


def sizes(source, pruned):
    """Rows, parameters (of model.safetensors) and bytes on disk, before and after."""
    before, kept = int(read_json(os.path.join(source, CONFIG))["vocab_size"]), len(vocab_lines(pruned))
    dropped_files = sorted(r for r in relative_files(source) if r.endswith(WEIGHT_SUFFIXES) and r != SAFE_WEIGHTS)
    return {"rows": {"before": before, "kept": kept, "dropped": before - kept},
            "kept_list": VOCAB,  # line i is the token of new id i, old_ids[i] its id before
            "parameters": {"before": parameter_count(source), "after": parameter_count(pruned)},
            "bytes_on_disk": {"before": bytes_on_disk(source), "after": bytes_on_disk(pruned)},
            "dropped_weight_files": {name: "holds the unpruned table; model.safetensors is the one kept"
                                     for name in dropped_files}}


def source_manifest(source):
    path = os.path.join(source, MANIFEST)
    return read_json(path) if os.path.isfile(path) else {}


def finished(out_dir, identity):
    """``out_dir``'s manifest when it is a complete pruning of the same source for the same characters."""
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        return None
    try:
        manifest = read_manifest(out_dir, STAGE)
    except UserError as err:
        log.info("vocabulary pruning: %s is not reusable (%s); pruning again", out_dir, err)
        return None
    return manifest if all(manifest.get(k) == v for k, v in identity.items()) else None


def pruning_sizes(directory):
    """What the benchmark reports for a model fine-tuned from ``directory``: rows, parameters and bytes
    on disk before and after pruning, from its manifest; None when ``directory`` is not a pruned model."""
    if not directory or not os.path.isfile(os.path.join(directory, MANIFEST)):
        return None
    manifest = read_json(os.path.join(directory, MANIFEST))
    if manifest.get("stage") != STAGE:
        return None
    return {k: manifest[k] for k in ("rows", "parameters", "bytes_on_disk", "source_dir")}


def summary(figures):
    """One line of ``pruning_sizes`` (or a pruning manifest) figures."""
    rows, params, size = figures["rows"], figures["parameters"], figures["bytes_on_disk"]
    return (f"kept {rows['kept']:,} of {rows['before']:,} vocabulary rows ({rows['dropped']:,} dropped); "
            f"parameters {params['before']:,} -> {params['after']:,}; "
            f"bytes on disk {size['before']:,} -> {size['after']:,}")
