"""Reconstruction as a stage: a trained width of a supernet, or the student, refit against the teacher
(``reconstruction.reconstruct``), kept only when dev F1 rises, and rewritten in place (atomically)
with what was done in its manifest: calibration sentences, ridge, each layer's error before and after.
A directory whose manifest already records a reconstruction is left as it is (``--resume`` and reruns).
"""
import logging
import os
import shutil
import time
from functools import partial

from ner_compress.compress.matches import layer_map
from ner_compress.compress.reconstruction import RIDGE_GRID, calibration_set, reconstruct
from ner_compress.compress.supernet import SUPERNET_WEIGHTS
from ner_compress.compress.training import evaluate
from ner_compress.core import parallel
from ner_compress.core.artifacts import MANIFEST, atomic_dir, read_manifest, weight_hashes, write_json
from ner_compress.core.checkpoint import load_weights, save_weights
from ner_compress.core.console import detail
from ner_compress.core.errors import UserError
from ner_compress.models.modeling import build_sub_model, into_supernet_state, load_pretrained, numpy_logits
from ner_compress.models.families import load_config, model_class_for
from ner_compress.models.width_plan import width_plan

log = logging.getLogger("ner_compress")
RECORD = "reconstruction"


def check_calibration(data):
    if not data.splits.train:
        raise UserError("reconstruction: the training split is empty; calibration reads training sentences "
                        "(give --train_file)")


def calibration(cfg, data):
    check_calibration(data)
    return calibration_set(data.windows("train"), cfg.calibration_sentences, cfg.per_device_eval_batch_size,
                           data.encoder.pad_id, cfg.seed)


def refit(cfg, data, model, teacher, cache=None):
    """Reconstruct ``model`` in place against ``teacher``: the record of what was done (no dev score yet).
    ``cache``: a dict kept across refits against the same teacher (calibration and the teacher's targets)."""
    cache = {} if cache is None else cache
    if "calibration" not in cache:
        cache["calibration"] = calibration(cfg, data)
    calib = cache["calibration"]
    wall, cpu = time.perf_counter(), time.process_time()
    layers = reconstruct(model, teacher, calib, layer_map(model.config.num_hidden_layers,
                                                          teacher.config.num_hidden_layers),
                         cfg.reconstruction_target, targets_cache=cache.setdefault("targets", {}))
    return {"calibration": {"split": "train", "sentences": calib.sentences, "seed": cfg.seed,
                            "held_out_batches": sum(calib.held_out)},
            "target": cfg.reconstruction_target, "ridge_grid": list(RIDGE_GRID), "layers": layers,
            "seconds": round(time.perf_counter() - wall, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}


def refit_and_score(cfg, data, model, teacher, before_f1, cache=None):
    """Reconstruct ``model`` in place and score it on dev: (record, dev scores after); ``cache`` as ``refit``'s."""
    record = refit(cfg, data, model, teacher, cache)
    scores = evaluate(partial(numpy_logits, model), data, data.windows("dev"), cfg.per_device_eval_batch_size,
                      cfg.decoding)
    record.update({"dev_f1_before": before_f1, "dev_f1_after": scores["f1"], "kept": scores["f1"] > before_f1})
    return record, scores


def rewrite(directory, manifest, record, scores, write_weights):
    """``directory`` again with ``record`` in its manifest, and the refit weights and dev scores if kept."""
    with atomic_dir(directory) as tmp:
        for name in os.listdir(directory):
            if name != MANIFEST:
                shutil.copy2(os.path.join(directory, name), tmp)
        metrics = dict(manifest.get("metrics", {}))
        if record["kept"]:
            write_weights(tmp)
            metrics.update({"dev_f1": scores["f1"], "dev": scores})
        write_json(os.path.join(tmp, MANIFEST), {**manifest, "metrics": metrics, RECORD: record,
                                                 "weights_sha256": weight_hashes(tmp)})


def log_record(name, record):
    log.info("%s: reconstruction %s dev F1 %.4f -> %.4f (%d calibration sentences, %.0f CPU-s)", name,
             "kept," if record["kept"] else "not kept (dev F1 did not rise),", record["dev_f1_before"],
             record["dev_f1_after"], record["calibration"]["sentences"], record["cpu_seconds"])


def unchanged_start(manifest):
    """Kept at step 0 and either width 1.0 of a supernet (its source model, heads reordered) or a student
    whose start was refit: a refit would only repeat what made it."""
    if manifest["metrics"].get("step") != 0:
        return False
    return manifest.get("effective_width_mult") == 1.0 or bool(manifest.get("start_reconstruction"))


def reconstruct_dir(cfg, data, teacher, directory, stage, load, write_weights, name):
    """The shared flow: skip a recorded reconstruction, else load, refit, score, and rewrite."""
    manifest = read_manifest(directory, stage)
    if RECORD in manifest:
        log.info("%s: already reconstructed (%s)", name, directory)
        return manifest[RECORD]
    if unchanged_start(manifest):
        detail.info("%s: kept its start (step 0), which is its source or was refit already; nothing to refit", name)
        return None
    model = load(manifest)
    if model.config.hidden_size != teacher.config.hidden_size:
        detail.info("%s: hidden size %d, the teacher's %d: no layer output to refit against", name,
                    model.config.hidden_size, teacher.config.hidden_size)
        return None
    record, scores = refit_and_score(cfg, data, model, teacher, manifest["metrics"]["dev_f1"])
    if parallel.is_writer():
        rewrite(directory, manifest, record, scores, partial(write_weights, model))
    log_record(name, record)
    return record


def reconstruct_width(cfg, data, teacher, width_dir, width, name):
    """A width of a supernet (``ofa/width_W``): the sub-model is refit, its slice written back into the
    supernet weights that export reads."""
    weights = os.path.join(width_dir, SUPERNET_WEIGHTS)
    state = load_weights(weights)

    def write(model, tmp):
        save_weights(into_supernet_state(state, model.state_dict()), os.path.join(tmp, SUPERNET_WEIGHTS))

    def load(manifest):
        return build_sub_model(width_dir, width_plan(load_config(width_dir, "ofa"), width), state, flag="ofa")

    return reconstruct_dir(cfg, data, teacher, width_dir, "ofa", load, write, name)


def reconstruct_model_dir(cfg, data, teacher, model_dir, stage):
    """A whole model directory (the student): refit, and saved with ``save_pretrained`` if kept."""
    def load(manifest):
        model = load_pretrained(model_class_for(model_dir, stage), model_dir, flag=stage)
        model.eval()
        return model

    def write(model, tmp):
        model.save_pretrained(tmp, safe_serialization=True)

    return reconstruct_dir(cfg, data, teacher, model_dir, stage, load, write, stage)
