"""ONNX Runtime INT8 copies of an exported graph, kept only when dev F1 holds.

``dynamic``: ``quantize_dynamic``, int8 MatMul/Attention weights, activations quantized per call
(fused Attention becomes QAttention). ``static``: QDQ with activation ranges calibrated on training
windows and per-channel int8 weights (MatMul/Gemm; the fused Attention stays FP32). Either may leave
``nodes_to_exclude`` in FP32 (``int8_search`` chooses them). On a graph from the transformer optimizer
both need ``DefaultTensorType``: shape inference does not type the fused nodes' outputs. Calibration
reads training sentences only: dev decides whether a copy is kept (``int8_refusal``), test is reported.
"""
import contextlib
import logging
import os
import random

from onnx import TensorProto

from ner_compress.data.corpus import encode
from ner_compress.data.decoding import Decoder
from ner_compress.core.errors import UserError
from ner_compress.data.window_scores import model_inputs, sentence_log_probs
from ner_compress.data.entity_scores import entity_scores

log = logging.getLogger("ner_compress")
INT8_METHODS = ("dynamic", "static")
CALIBRATION_BATCH_SIZE = 16
UNTYPED_FUSED_OUTPUTS = {"DefaultTensorType": TensorProto.FLOAT}
QUANTIZER_SOURCES = os.path.join("onnxruntime", "quantization", "")
# advice for image models: our graphs are already shape-inferred (``typed``) and optimized (``onnx_graph``)
HARMLESS_QUANTIZER_WARNINGS = ("consider to run pre-processing", "consider pre-processing")


def calibration_sentences(train, count, seed):
    """``count`` training sentences drawn with ``seed`` (all of them when there are fewer), in corpus order."""
    chosen = sorted(random.Random(seed).sample(range(len(train)), min(count, len(train))))
    return [train[i] for i in chosen]


def calibration_windows(data, count, seed):
    """The windows of ``calibration_sentences`` of the training split: never dev, which decides, nor test."""
    return encode(calibration_sentences(data.splits.train, count, seed), data.encoder, data.label_to_id,
                  data.max_seq_length)


def calibration_feeds(windows, pad_id, batch_size=CALIBRATION_BATCH_SIZE):
    """Feed dicts of ``windows`` in batches of ``batch_size``, padded as the taggers pad them."""
    return [model_inputs(windows[i: i + batch_size], pad_id) for i in range(0, len(windows), batch_size)]


def feed_reader(feeds):
    """``feeds`` as the ``CalibrationDataReader`` that ``quantize_static`` reads."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(feeds)

        def get_next(self):
            return next(self.remaining, None)

    return Feeds()


class QuantizerNoise(logging.Filter):
    """ONNX Runtime's quantizer logs through the root logger: drop its INFO lines (one per tensor) and its
    pre-processing advice; its other warnings, and everyone else's records, pass."""

    def filter(self, record):
        if QUANTIZER_SOURCES not in record.pathname:
            return True
        message = record.getMessage()
        return record.levelno >= logging.WARNING and not any(s in message for s in HARMLESS_QUANTIZER_WARNINGS)


@contextlib.contextmanager
def quiet_quantizer():
    noise, root = QuantizerNoise(), logging.getLogger()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


def typed(onnx_path):
    """The graph with every tensor typed by ONNX Runtime's symbolic shape inference, which knows its fused
    ops: without it ``quantize_static`` finds no activation type after SkipLayerNorm/BiasGelu/Attention and
    quantizes the weights only (measured: 37 DequantizeLinear, no QuantizeLinear, on 12 x 384)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(onnx.load(onnx_path), auto_merge=True)


def quantize(method, fp32_path, out_path, feeds=(), nodes_to_exclude=(), calibration_cache=None):
    """Write the INT8 copy of ``fp32_path`` made by ``method`` (see the module docstring), the nodes named in
    ``nodes_to_exclude`` left in FP32. ``calibration_cache``: a JSON file of static activation ranges, written
    by the first call and read by the next ones (the ranges do not depend on the nodes excluded)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    exclude = list(nodes_to_exclude)
    with quiet_quantizer():
        if method == "dynamic":
            # per-channel 7-bit weights (reduce_range): AVX2 without VNNI multiplies u8 x s8 in 16-bit pairs,
            # which saturate with full-range weights. Measured on the default run's teacher (dev F1 57.53):
            # plain QInt8 lost 1.27 points, per-channel + reduce_range 0.79 (entity agreement 89.9%)
            quantize_dynamic(fp32_path, out_path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                             nodes_to_exclude=exclude, extra_options=UNTYPED_FUSED_OUTPUTS)
        elif method == "static":
            quantize_static(typed(fp32_path), out_path, feed_reader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude,
                            calibration_cache_path=calibration_cache, extra_options=UNTYPED_FUSED_OUTPUTS)
        else:
            raise UserError(f"--onnx_int8_method {method}: use one of {', '.join(INT8_METHODS)}")
    return out_path


def dev_tags(logits_fn, data, windows, batch_size, decoding):
    """Predicted BIO tags per dev sentence, decoded as ``predict.py`` decodes."""
    decoder = Decoder(data.labels, decoding)
    scores = sentence_log_probs(logits_fn, data.splits.dev, windows, batch_size, data.encoder.pad_id)
    return [decoder(s) for s in scores]


class DevParity:
    """Dev F1 of INT8 copies against their FP32 graph's, which is decoded once."""

    def __init__(self, fp32_logits, data, batch_size=32, decoding="viterbi"):
        self.data, self.batch_size, self.decoding = data, batch_size, decoding
        self.windows = data.windows("dev")
        self.gold = [s.tags for s in data.splits.dev]
        self.fp32 = dev_tags(fp32_logits, data, self.windows, batch_size, decoding)
        self.f1_fp32 = 100 * entity_scores(self.gold, self.fp32)["f1"]

    def __call__(self, int8_logits):
        """Dev F1 of both (points, against gold) and entity agreement: the INT8 entities' F1 against FP32's."""
        int8 = dev_tags(int8_logits, self.data, self.windows, self.batch_size, self.decoding)
        f1_int8 = 100 * entity_scores(self.gold, int8)["f1"]
        agreement = entity_scores(self.fp32, int8)
        return {"dev_f1_fp32": self.f1_fp32, "dev_f1_int8": f1_int8, "f1_drop_points": self.f1_fp32 - f1_int8,
                "entity_agreement_f1": 100 * agreement["f1"], "fp32_entities": agreement["support"],
                "int8_entities": agreement["predicted"]}


def int8_refusal(best, max_drop, int8_file, methods_tried):
    """The one-line reason to refuse INT8 when ``best`` (the tried configuration that lost the least) loses
    more than ``max_drop`` dev F1 points (None: keep it)."""
    if best["f1_drop_points"] <= max_drop:
        return None
    untried = "".join(f"try --onnx_int8_method {m}, " for m in INT8_METHODS if m not in methods_tried)
    return (f"--int8_max_f1_drop {max_drop:g}: {best['method']} INT8 drops dev F1 by {best['f1_drop_points']:.2f} "
            f"points ({best['dev_f1_fp32']:.2f} -> {best['dev_f1_int8']:.2f}) at best ({best['configuration']}), "
            f"so {int8_file} was not written (the FP32 export was); raise the margin, {untried}"
            f"or set onnx_int8: false")
