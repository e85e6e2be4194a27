"""The ONNX files an export writes beside paddle2onnx's ``model.onnx``, and what its manifest says of them.

``model.opt.onnx``: the graph after ``onnx_graph.fuse`` (Attention, SkipLayerNorm, BiasGelu,
EmbedLayerNorm), held to the same parity as ``model.onnx``; when the optimizer fails or parity
does not hold it is not written and the reason is recorded (ONNX Runtime then runs ``model.onnx``).
``model.int8.onnx``: the INT8 copy of the best FP32 graph that ``int8_search`` chose (the whole graph, or
with its most sensitive layers left in FP32), kept only when its dev F1 is within ``int8_max_f1_drop``
points of FP32's; every configuration tried is recorded, a refusal is recorded and returned as one line.
"""
import logging
import os
import time

from ner_compress.deploy import int8_search, onnx_graph, onnx_quant
from ner_compress.deploy.backends import FUSED_FILE, INT8_FILE, OnnxTagger
from ner_compress.core.errors import UserError

log = logging.getLogger("ner_compress")


def _fallback(path, reason):
    if os.path.exists(path):
        os.remove(path)
    log.warning("ONNX fusion skipped: %s", reason)
    return {"file": None, "fallback_reason": reason}


def fused_variant(static_dir, onnx_path, plan, num_layers, check, inputs, threads=None):
    """Fuse ``onnx_path`` into ``model.opt.onnx``; ``check({name: logits})`` is export's parity check."""
    path = os.path.join(os.path.dirname(onnx_path), FUSED_FILE)
    try:
        meta = onnx_graph.fuse(onnx_path, path, *onnx_graph.fusion_sizes(plan))
    except Exception as err:  # noqa: BLE001 -- the optimizer asserts on graphs it half-matches
        return _fallback(path, f"transformer optimizer failed ({type(err).__name__}: {err})")
    try:
        logits = OnnxTagger(static_dir, path, threads=threads).logits(*inputs)
        meta["parity_max_abs_diff"] = check({"fused onnx runtime": logits})["fused onnx runtime"]
    except (RuntimeError, UserError) as err:  # ORT failing to run it, or parity refused
        return _fallback(path, str(err))
    attention = meta["fused"]["Attention"] + meta["fused"]["MultiHeadAttention"]
    if attention < num_layers:
        meta["attention_not_fused"] = (f"Attention fused in {attention} of {num_layers} layers (graph rewrites: "
                                       f"{meta['rewrites']}); the other layers run as separate ops")
    return {**meta, "file": FUSED_FILE}


def int8_variant(cfg, data, static_dir, fp32_path, threads=None):
    """Search ``fp32_path``'s INT8 copies (``int8_search``), keep the chosen one as ``model.int8.onnx``; the
    manifest's record of the search (None: onnx_int8 off)."""
    if not cfg.onnx_int8 or cfg.device != "cpu":
        return None
    start = time.perf_counter()
    windows = onnx_quant.calibration_windows(data, cfg.int8_calibration_sentences, cfg.int8_calibration_seed)

    def logits_for(path):
        return OnnxTagger(static_dir, path, threads=threads).logits

    judge = onnx_quant.DevParity(logits_for(fp32_path), data, cfg.per_device_eval_batch_size, cfg.decoding)
    search = int8_search.Search(fp32_path, onnx_quant.calibration_feeds(windows, data.encoder.pad_id),
                                data.encoder.pad_id, logits_for, judge, cfg.int8_max_f1_drop)
    methods = onnx_quant.INT8_METHODS if cfg.onnx_int8_method == "both" else (cfg.onnx_int8_method,)
    try:
        record = int8_search.best_copy(search, methods, cfg.int8_search == "on",
                                       int8_search.speed_feeds(windows, data.encoder.pad_id),
                                       os.path.join(os.path.dirname(fp32_path), INT8_FILE))
    finally:
        search.close()
    calibration = {"split": "train", "sentences": cfg.int8_calibration_sentences, "seed": cfg.int8_calibration_seed,
                   "windows": len(windows)}
    return int8_entry(cfg, record, {"source": os.path.basename(fp32_path), "calibration": calibration,
                                    "search_seconds": time.perf_counter() - start})


def int8_entry(cfg, record, facts):
    """The manifest's ``int8`` entry: the chosen copy's figures (else the least lossy tried, and the refusal),
    every configuration tried, the layer ranking, and ``facts``."""
    chosen = record.pop("chosen")
    best = chosen or min(record["tried"], key=lambda t: t["f1_drop_points"])
    refusal = onnx_quant.int8_refusal(best, cfg.int8_max_f1_drop, INT8_FILE, {t["method"] for t in record["tried"]})
    return {**{k: v for k, v in best.items() if k != "passed"}, **facts, "search": cfg.int8_search, **record,
            "max_f1_drop": cfg.int8_max_f1_drop, "refused": refusal, "file": None if refusal else INT8_FILE}


def int8_summary(entry):
    """The INT8 copy an export kept, in a few words (the refusal itself is raised as a warning or an error)."""
    if not entry:
        return "off"
    if entry["refused"]:
        return f"not written: {entry['method']} loses {entry['f1_drop_points']:.2f} dev F1 points at best"
    return (f"kept: {entry['method']}, {entry['configuration']}, dev F1 {entry['dev_f1_fp32']:.2f} -> "
            f"{entry['dev_f1_int8']:.2f}, {entry['speedup_vs_fp32_b32']:.2f}x FP32 at batch 32")


def write_variants(cfg, data, static_dir, onnx_path, plan, num_layers, check, inputs):
    """Both files beside ``onnx_path``; returns the manifest's ``onnx`` entry (``int8.refused``: the refusal)."""
    fusion = fused_variant(static_dir, onnx_path, plan, num_layers, check, inputs, cfg.cpu_threads)
    fp32_path = os.path.join(os.path.dirname(onnx_path), fusion["file"]) if fusion["file"] else onnx_path
    return {"fusion": fusion, "int8": int8_variant(cfg, data, static_dir, fp32_path, cfg.cpu_threads)}
