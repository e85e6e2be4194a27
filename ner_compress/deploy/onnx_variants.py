"""The ONNX files an export writes beside paddle2onnx's ``model.onnx``, and what its manifest says of them.

``model.opt.onnx``: the graph after ``onnx_graph.fuse`` (Attention, SkipLayerNorm, BiasGelu,
EmbedLayerNorm), held to the same parity as ``model.onnx``; when the optimizer fails or parity
does not hold it is not written and the reason is recorded (ONNX Runtime then runs ``model.onnx``).
``model.int8.onnx``: ``onnx_quant``'s copy of the best FP32 graph, kept only when its dev F1 is
within ``int8_max_f1_drop`` points of FP32's; a refusal is recorded and returned as one line.
"""
import logging
import os

from ner_compress.deploy import onnx_graph, onnx_quant
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
        meta = onnx_graph.fuse(onnx_path, path, plan.heads, plan.attention_width)
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
    """Quantize ``fp32_path`` into ``model.int8.onnx`` and compare the two on dev (None: onnx_int8 off)."""
    if not cfg.onnx_int8 or cfg.device != "cpu":
        return None
    path = os.path.join(os.path.dirname(fp32_path), INT8_FILE)
    feeds = onnx_quant.calibration_feeds(data.windows("dev"), data.encoder.pad_id)
    onnx_quant.quantize(cfg.onnx_int8_method, fp32_path, path, feeds)
    parity = onnx_quant.int8_parity(OnnxTagger(static_dir, fp32_path, threads=threads).logits,
                                    OnnxTagger(static_dir, path, threads=threads).logits,
                                    data, cfg.per_device_eval_batch_size, cfg.decoding)
    refusal = onnx_quant.int8_refusal(parity, cfg.int8_max_f1_drop, cfg.onnx_int8_method)
    if refusal:
        os.remove(path)
    log.info("ONNX INT8 (%s): dev F1 %.2f -> %.2f, entity agreement %.2f%s", cfg.onnx_int8_method,
             parity["dev_f1_fp32"], parity["dev_f1_int8"], parity["entity_agreement_f1"], " (refused)" * bool(refusal))
    return {"method": cfg.onnx_int8_method, "source": os.path.basename(fp32_path), **parity,
            "max_f1_drop": cfg.int8_max_f1_drop, "refused": refusal, "file": None if refusal else INT8_FILE}


def write_variants(cfg, data, static_dir, onnx_path, plan, num_layers, check, inputs):
    """Both files beside ``onnx_path``; returns the manifest's ``onnx`` entry (``int8.refused``: the refusal)."""
    fusion = fused_variant(static_dir, onnx_path, plan, num_layers, check, inputs, cfg.cpu_threads)
    fp32_path = os.path.join(os.path.dirname(onnx_path), fusion["file"]) if fusion["file"] else onnx_path
    return {"fusion": fusion, "int8": int8_variant(cfg, data, static_dir, fp32_path, cfg.cpu_threads)}
