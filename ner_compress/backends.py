"""Inference backends behind one ``Tagger`` interface: Paddle Inference, ONNX Runtime, dynamic graph.

Each backend only implements ``logits(input_ids, token_type_ids) -> numpy``; windowing,
decoding and entity extraction live in ``inference.Tagger``. ``load_tagger`` picks one by name.
"""
import os

import numpy as np
import paddle.inference as paddle_infer

from .errors import UserError
from .inference import MODEL_PREFIX, Tagger
from .modeling import numpy_logits

BACKENDS = ("paddle", "onnxruntime")


def predictor_config(model_dir, device="cpu", threads=None, mkldnn=True):
    config = paddle_infer.Config(os.path.join(model_dir, MODEL_PREFIX + ".pdmodel"),
                                 os.path.join(model_dir, MODEL_PREFIX + ".pdiparams"))
    if device == "gpu":
        config.enable_use_gpu(256, 0)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
        if mkldnn:
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(16)  # shapes vary per batch; bound oneDNN's cache
    config.switch_ir_optim(True)
    config.disable_glog_info()
    return config


class StaticTagger(Tagger):
    """Tags texts with an exported static model through Paddle Inference."""

    def __init__(self, model_dir, device="cpu", threads=None, mkldnn=True, batch_size=32, int8=False,
                 decoding="viterbi"):
        super().__init__(model_dir, batch_size, decoding)
        config = predictor_config(model_dir, device, threads, mkldnn)
        if int8 and device == "cpu":
            # INT8 kernels for the linear layers only: letting oneDNN also quantize the attention
            # matmuls (fused_matmul) dropped test F1 from 0.30 to 0.10 on the demo model, while
            # fake-quant simulation of the same calibration kept 0.298 (measured, Paddle 2.6.2)
            config.enable_mkldnn_int8({"fc"})
        self.predictor = paddle_infer.create_predictor(config)
        self.input_names = self.predictor.get_input_names()

    def logits(self, input_ids, token_type_ids):
        feeds = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        for name in self.input_names:
            handle = self.predictor.get_input_handle(name)
            handle.reshape(feeds[name].shape)
            handle.copy_from_cpu(np.ascontiguousarray(feeds[name]))
        self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()


def export_onnx(static_dir, onnx_path):
    import paddle2onnx

    paddle2onnx.export(os.path.join(static_dir, MODEL_PREFIX + ".pdmodel"),
                       os.path.join(static_dir, MODEL_PREFIX + ".pdiparams"), save_file=onnx_path,
                       opset_version=13, enable_onnx_checker=True)
    return onnx_path


class OnnxTagger(Tagger):
    """The same static model converted by paddle2onnx, run by ONNX Runtime."""

    def __init__(self, static_dir, onnx_path, threads=None, batch_size=32, decoding="viterbi"):
        import onnxruntime as ort

        super().__init__(static_dir, batch_size, decoding)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

    def logits(self, input_ids, token_type_ids):
        return self.session.run(None, {"input_ids": input_ids, "token_type_ids": token_type_ids})[0]


class DynamicTagger(Tagger):
    """The exported dynamic-graph model, for the static-vs-dynamic comparison."""

    def __init__(self, export_dir, batch_size=32, decoding="viterbi"):
        from .architectures import model_class_for

        super().__init__(os.path.join(export_dir, "static"), batch_size, decoding)
        dynamic = os.path.join(export_dir, "dynamic")
        self.model = model_class_for(dynamic).from_pretrained(dynamic)
        self.model.eval()

    def logits(self, input_ids, token_type_ids):
        return numpy_logits(self.model, input_ids, token_type_ids)


def load_tagger(model_dir, backend="paddle", device="cpu", threads=None, batch_size=32, decoding="viterbi"):
    """A ready ``Tagger`` over an exported static directory (``DIR/export/<model>/static``)."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: unknown; use one of {', '.join(BACKENDS)}")
    if backend == "paddle":
        return StaticTagger(model_dir, device=device, threads=threads, batch_size=batch_size, decoding=decoding)
    onnx_path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "onnx", "model.onnx")
    if not os.path.isfile(onnx_path):
        raise UserError(f"--backend onnxruntime: no {onnx_path}; re-run `python tools/export.py` to write it")
    return OnnxTagger(model_dir, onnx_path, threads=threads, batch_size=batch_size, decoding=decoding)
