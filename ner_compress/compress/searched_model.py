"""Sub-models with their own heads and neurons per layer, cut from the teacher for a latency budget.

The teacher's units are sorted by Fisher importance on training sentences (``unit_importance``); a plan
(``plan_search``) keeps each layer's leading ones. Candidates are scored on dev as cut, the best
``REFIT_CANDIDATES`` are refit to the teacher layer by layer (``reconstruction``; kept only where dev F1 rises),
and the best on dev is kept; ``--search_max_steps`` also distils it from the teacher (``distil``; the refit
start kept unless training beats it on dev). Test is never read here.
"""
import copy
import hashlib
import os
import time
from functools import partial

import numpy as np

from ner_compress.compress import reconstruction_stage
from ner_compress.compress.matches import default_matches
from ner_compress.compress.student import StudentDistiller
from ner_compress.compress.supernet import importance_batches
from ner_compress.compress.training import Stage, best_dev_eval, evaluate, parameters_digest, run_stage
from ner_compress.core.artifacts import atomic_file
from ner_compress.core.console import detail
from ner_compress.compress.unit_importance import fisher_importance, reorder_by_importance
from ner_compress.models.modeling import build_sub_model, numpy_logits
from ner_compress.models.width_plan import layer_plan

# measured: the refit lifted a per-layer cut 4.1 dev points, a uniform one 2.0; in 2 of 4 searches on the
# 12-layer teacher the model kept was the second or third best as cut
REFIT_CANDIDATES = 3


def ranked_teacher(cfg, data, teacher, cache_path=None):
    """A copy of ``teacher`` with each layer's heads and neurons sorted by Fisher importance, its state (numpy),
    and the sorted importances (heads [layers, heads], neurons [layers, neurons]). ``cache_path``: where the
    importance is kept for the next search on the same teacher and training batches."""
    model = copy.deepcopy(teacher)
    batches = importance_batches(data.windows("train"), cfg.per_device_eval_batch_size, cfg.importance_batches,
                                 data.encoder.pad_id, cfg.seed)
    start = time.process_time()
    importance, cached = cached_importance(model, batches, cache_path)
    heads, neurons = reorder_by_importance(model, *importance)
    detail.info("search: Fisher importance of %d heads and %d neurons on %d training batches (%s)", heads.size,
                neurons.size, len(batches), "cached" if cached else f"{time.process_time() - start:.0f} CPU-s")
    model.eval()
    return model, {k: v.numpy() for k, v in model.state_dict().items()}, heads, neurons


def importance_key(model, batches):
    """What an importance is valid for: the model's weights and the batches' ids and labels."""
    digest = hashlib.sha256(parameters_digest(model).encode())
    for batch in batches:
        for name in ("input_ids", "token_type_ids", "labels"):
            digest.update(np.ascontiguousarray(batch[name].numpy()).tobytes())
    return digest.hexdigest()


def cached_importance(model, batches, path):
    """((heads, neurons) Fisher importance, read from ``path``?): read when it was computed for the same weights
    and batches (one search per budget on a teacher pays for it once), else computed and written there."""
    key = importance_key(model, batches)
    if path and os.path.isfile(path):
        with np.load(path) as saved:
            if str(saved["key"]) == key:
                return (saved["heads"], saved["neurons"]), True
    heads, neurons = fisher_importance(model, batches)
    if path:
        with atomic_file(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), heads=heads, neurons=neurons)
    return (heads, neurons), False


def plan_model(teacher_dir, teacher, state, plan):
    """The family's NER class cut to ``plan`` (a ``search.Plan``), holding the leading slice of ``state``."""
    return build_sub_model(teacher_dir, layer_plan(teacher.config, plan.heads, plan.neurons), state, flag="teacher")


def dev_f1(cfg, data, model):
    return evaluate(partial(numpy_logits, model), data, data.windows("dev"), cfg.per_device_eval_batch_size,
                    cfg.decoding)["f1"]


def best_candidate(cfg, data, teacher_dir, teacher, state, plans):
    """(model, plan, record of every candidate) of ``plans``, (what chose it, plan) pairs: each scored on dev as
    cut, the best few refit, the best on dev kept."""
    scored = []
    for source, plan in plans:
        start = time.perf_counter()
        model = plan_model(teacher_dir, teacher, state, plan)
        scored.append({"plan": plan, "source": source, "model": model, "dev_f1_cut": dev_f1(cfg, data, model),
                       "seconds": time.perf_counter() - start})
        detail.info("search: %s predicted %.3f ms, dev F1 as cut %.4f", plan.describe(), plan.predicted_ms,
                    scored[-1]["dev_f1_cut"])
    scored.sort(key=lambda c: -c["dev_f1_cut"])
    cache = {}  # one calibration set and one teacher pass for every refit
    for candidate in scored[:0 if cfg.skip_reconstruction else REFIT_CANDIDATES]:
        start = time.perf_counter()
        record, after = reconstruction_stage.refit_and_score(cfg, data, candidate["model"], teacher,
                                                             candidate["dev_f1_cut"], cache)
        candidate["seconds"] += time.perf_counter() - start
        if not record["kept"]:  # the refit lowered dev F1: back to the cut weights
            candidate["model"] = plan_model(teacher_dir, teacher, state, candidate["plan"])
        candidate["reconstruction"] = record
        detail.info("search: %s refit dev F1 %.4f -> %.4f", candidate["plan"].describe(), candidate["dev_f1_cut"],
                    after["f1"])
    for candidate in scored:
        rec = candidate.get("reconstruction")
        candidate["dev_f1"] = rec["dev_f1_after"] if rec and rec["kept"] else candidate["dev_f1_cut"]
    best = max(scored, key=lambda c: c["dev_f1"])
    return best["model"], best["plan"], [candidate_record(c) for c in scored]


def candidate_record(candidate):
    plan = candidate["plan"]
    rec = candidate.get("reconstruction")
    return {"layer_heads": list(plan.heads), "layer_ffn_neurons": list(plan.neurons),
            "predicted_ms": round(plan.predicted_ms, 4), "values": candidate["source"],
            "dev_f1_cut": candidate["dev_f1_cut"], "dev_f1": candidate["dev_f1"],
            "refit": "not tried" if rec is None else "kept" if rec["kept"] else "not kept (dev F1 fell)",
            "seconds": round(candidate["seconds"], 1)}


def distil(cfg, data, teacher, model, schedule, checkpoint_root):
    """``model`` distilled from ``teacher`` as a student of the same depth (soft and hard labels, each layer's
    hidden states), scored on dev at step 0 and every ``schedule.eval_steps``; it ends holding the best weights.
    Returns the training record (steps, the step kept, dev F1 before and after, CPU-seconds)."""
    layers = model.config.num_hidden_layers
    distiller = StudentDistiller(teacher, model, default_matches(layers, layers, cfg.lambda_distill), cfg)
    kept = {}

    def keep_weights(state):  # the first best is step 0's: the refit the training starts from
        kept.setdefault("dev_f1_before", state["best"]["dev_f1"])
        kept["weights"] = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    start = time.process_time()
    eval_fn = best_dev_eval("search", model, data, cfg, keep_weights)
    state = run_stage(cfg, Stage(name="search", model=distiller.model, data=data, schedule=schedule,
                                 step_fn=distiller.step, eval_fn=eval_fn, checkpoint_root=checkpoint_root))
    model.set_state_dict(kept["weights"])
    model.eval()
    return {"steps": state["step"], "learning_rate": schedule.learning_rate, "kept_step": state["best"]["step"],
            "dev_f1_before": kept["dev_f1_before"], "dev_f1": state["best"]["dev_f1"],
            "cpu_seconds": round(time.process_time() - start, 1)}
