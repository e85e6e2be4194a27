"""Artifacts that describe themselves and are never half-written.

Every stage writes into ``<name>.partial-<pid>`` and renames it into place when complete,
so a directory is either the old version or the new one. ``manifest.json`` beside the
weights says what made them: stage, version, resolved config, labels, vocabulary hash,
metrics, the manifests of the inputs and the sha256 of each weight file.
"""
import contextlib
import datetime
import json
import os
import shutil

from ner_compress import __version__
from ner_compress.core.errors import UserError
from ner_compress.core.resources import file_digest
from ner_compress.core.static_files import PROGRAM_FILES

MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".pdparams", ".safetensors", ".pdiparams", ".pdmodel", ".onnx")

# which command makes each stage's directory, for "missing input" messages
MAKERS = {
    "teacher": "python tools/train_teacher.py",
    "ofa": "python tools/ofa_compress.py",
    "student": "python tools/distill.py",
    "export": "python tools/export.py",
    "search": "python tools/search.py",
}


@contextlib.contextmanager
def atomic_dir(final):
    """Yield a scratch directory; on success swap it in for ``final`` in one rename."""
    final = os.path.abspath(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    recover_interrupted(final)
    partial = f"{final}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(final):
    """Clean up after a writer that died (SIGKILL, power loss): drop its scratch directory, and
    if it died between its two renames, put the previous version (``.old-PID``) back in place."""
    parent, base = os.path.split(os.path.abspath(final))
    if not os.path.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        for marker in (".partial-", ".old-"):
            prefix = base + marker
            if not (name.startswith(prefix) and name[len(prefix):].isdigit()) or _alive(int(name[len(prefix):])):
                continue
            path = os.path.join(parent, name)
            if marker == ".old-" and not os.path.exists(os.path.join(parent, base)):
                os.replace(path, os.path.join(parent, base))
            else:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path):
    """A temporary path beside ``path`` to write, renamed onto ``path`` when the block ends without error (else
    removed): a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=2, sort_keys=True)


def weight_hashes(directory):
    return {name: file_digest(os.path.join(directory, name))
            for name in sorted(os.listdir(directory)) if name.endswith(WEIGHT_SUFFIXES) or name in PROGRAM_FILES}


# what identifies a manifest and where its model comes from; the rest (config, metrics) stays in the manifest
LINEAGE_FIELDS = ("stage", "weights_sha256", "vocab_sha256", "source", "licence")


def lineage(manifest):
    """``manifest`` cut to what identifies it, and the lineage of each of its inputs: by hash, back to the
    registry package a converted model names as its ``source``."""
    record = {k: manifest[k] for k in LINEAGE_FIELDS if k in manifest}
    inputs = {name: lineage(value) for name, value in manifest.get("inputs", {}).items() if isinstance(value, dict)}
    return {**record, "inputs": inputs} if inputs else record


def origin(record):
    """The first ``source`` and ``licence`` in a lineage, itself first, then its inputs depth first ({} if none)."""
    if "licence" in record:
        return {k: record[k] for k in ("source", "licence") if k in record}
    return next((found for value in record.get("inputs", {}).values() for found in [origin(value)] if found), {})


def model_input(directory):
    """A starting model directory as an input of what is made from it: its path, its weight files' sha256,
    the lineage of its manifest (if it has one) and the package and licence that lineage comes from."""
    path = os.path.join(directory, MANIFEST)
    manifest = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    record = lineage(manifest)
    return {**record, **origin(record), "path": os.path.abspath(directory), "weights_sha256": weight_hashes(directory)}


def write_manifest(directory, stage, config, labels, vocab_sha256, metrics=None, inputs=None, **extra):
    manifest = {
        "stage": stage,
        "tool": "ner_compress",
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "labels": list(labels),
        "vocab_sha256": vocab_sha256,
        "metrics": metrics or {},
        "inputs": inputs or {},
        "weights_sha256": weight_hashes(directory),
        **extra,
    }
    write_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


def read_manifest(directory, stage, verify_weights=True):
    """The manifest of a finished stage directory; a clear error when it is missing or tampered."""
    recover_interrupted(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        maker = MAKERS.get(stage, "the previous stage")
        raise UserError(f"{directory}: no finished {stage} artifact here ({MANIFEST} missing); run `{maker}` first")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: unreadable manifest ({err.msg}); re-run the stage that made it")
    if manifest.get("stage") != stage:
        raise UserError(f"{path}: made by stage {manifest.get('stage')!r}, expected {stage!r}")
    if verify_weights:
        for name, digest in manifest.get("weights_sha256", {}).items():
            file = os.path.join(directory, name)
            if not os.path.isfile(file) or file_digest(file) != digest:
                raise UserError(f"{file}: weight file missing or changed since {stage} wrote it (sha256 mismatch); "
                                f"re-run `{MAKERS.get(stage, 'the stage')}`")
    return manifest


def check_same_inputs(manifest, labels, vocab_sha256, where):
    """Refuse to continue a pipeline whose labels or vocabulary changed between stages."""
    if list(manifest["labels"]) != list(labels):
        raise UserError(f"{where}: labels {manifest['labels']} differ from this run's {list(labels)}; "
                        f"use the same data as the teacher or retrain it")
    if manifest["vocab_sha256"] != vocab_sha256:
        raise UserError(f"{where}: vocabulary sha256 {manifest['vocab_sha256'][:12]}... differs from "
                        f"this run's {vocab_sha256[:12]}...; use the teacher's --vocab_file")
