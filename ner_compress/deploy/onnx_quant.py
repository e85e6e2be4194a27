"""ONNX Runtime INT8 copies of an exported graph, kept only when dev F1 holds.

``dynamic``: ``quantize_dynamic``, int8 MatMul/Attention weights, activations quantized per call
(fused Attention becomes QAttention). ``static``: QDQ with activation ranges calibrated on dev
windows and per-channel int8 weights (MatMul/Gemm; the fused Attention stays FP32). On a graph
from the transformer optimizer both need ``DefaultTensorType``: shape inference does not type the
fused nodes' outputs. ``int8_refusal`` refuses a copy whose dev F1 drops more than the set margin.
"""
import logging

from onnx import TensorProto

from ner_compress.deploy.backends import INT8_FILE
from ner_compress.data.decoding import Decoder
from ner_compress.core.errors import UserError
from ner_compress.data.window_scores import model_inputs, sentence_log_probs
from ner_compress.data.entity_scores import entity_scores

log = logging.getLogger("ner_compress")
INT8_METHODS = ("dynamic", "static")
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 8, 16
UNTYPED_FUSED_OUTPUTS = {"DefaultTensorType": TensorProto.FLOAT}


def calibration_feeds(windows, pad_id, batches=CALIBRATION_BATCHES, batch_size=CALIBRATION_BATCH_SIZE):
    """Feed dicts of the first ``batches`` x ``batch_size`` windows, padded as the taggers pad them."""
    chunks = [windows[i: i + batch_size] for i in range(0, min(len(windows), batches * batch_size), batch_size)]
    return [model_inputs(chunk, pad_id) for chunk in chunks]


def feed_reader(feeds):
    """``feeds`` as the ``CalibrationDataReader`` that ``quantize_static`` reads."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(feeds)

        def get_next(self):
            return next(self.remaining, None)

    return Feeds()


def typed(onnx_path):
    """The graph with every tensor typed by ONNX Runtime's symbolic shape inference, which knows its fused
    ops: without it ``quantize_static`` finds no activation type after SkipLayerNorm/BiasGelu/Attention and
    quantizes the weights only (measured: 37 DequantizeLinear, no QuantizeLinear, on 12 x 384)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(onnx.load(onnx_path), auto_merge=True)


def quantize(method, fp32_path, out_path, feeds=()):
    """Write the INT8 copy of ``fp32_path`` made by ``method`` (see the module docstring)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method == "dynamic":
        # per-channel 7-bit weights (reduce_range): AVX2 without VNNI multiplies u8 x s8 in 16-bit pairs,
        # which saturate with full-range weights. Measured on the default run's teacher (dev F1 57.53):
        # plain QInt8 lost 1.27 points, per-channel + reduce_range 0.79 (entity agreement 89.9%)
        quantize_dynamic(fp32_path, out_path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         extra_options=UNTYPED_FUSED_OUTPUTS)
    elif method == "static":
        quantize_static(typed(fp32_path), out_path, feed_reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul", "Gemm"], extra_options=UNTYPED_FUSED_OUTPUTS)
    else:
        raise UserError(f"--onnx_int8_method {method}: use one of {', '.join(INT8_METHODS)}")
    return out_path


def dev_tags(logits_fn, data, windows, batch_size, decoding):
    """Predicted BIO tags per dev sentence, decoded as ``predict.py`` decodes."""
    decoder = Decoder(data.labels, decoding)
    scores = sentence_log_probs(logits_fn, data.splits.dev, windows, batch_size, data.encoder.pad_id)
    return [decoder(s) for s in scores]


def int8_parity(fp32_logits, int8_logits, data, batch_size=32, decoding="viterbi"):
    """Dev F1 of both (points, against gold) and entity agreement: the INT8 entities' F1 against FP32's."""
    windows = data.windows("dev")
    gold = [s.tags for s in data.splits.dev]
    fp32 = dev_tags(fp32_logits, data, windows, batch_size, decoding)
    int8 = dev_tags(int8_logits, data, windows, batch_size, decoding)
    f1_fp32, f1_int8 = (100 * entity_scores(gold, tags)["f1"] for tags in (fp32, int8))
    agreement = entity_scores(fp32, int8)
    return {"dev_f1_fp32": f1_fp32, "dev_f1_int8": f1_int8, "f1_drop_points": f1_fp32 - f1_int8,
            "entity_agreement_f1": 100 * agreement["f1"], "fp32_entities": agreement["support"],
            "int8_entities": agreement["predicted"]}


def int8_refusal(parity, max_drop, method):
    """The one-line reason to refuse an INT8 copy that loses more than ``max_drop`` dev F1 points (None: keep it)."""
    if parity["f1_drop_points"] <= max_drop:
        return None
    other = INT8_METHODS[1 - INT8_METHODS.index(method)]
    return (f"--int8_max_f1_drop {max_drop:g}: {method} INT8 drops dev F1 by {parity['f1_drop_points']:.2f} points "
            f"({parity['dev_f1_fp32']:.2f} -> {parity['dev_f1_int8']:.2f}), so {INT8_FILE} was not written (the FP32 "
            f"export was); raise the margin, try --onnx_int8_method {other}, or set onnx_int8: false")
