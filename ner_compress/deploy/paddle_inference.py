"""Paddle Inference behind the ``Tagger`` interface (``--backend paddle``): CPU with oneDNN (FP32, INT8) and
GPU with CUDA kernels or TensorRT. The only deploy module that imports paddle; ``backends.load_tagger``
imports it on demand, so the ONNX Runtime path and the deploy install (requirements-serve.txt) never load it.
"""
import os

import numpy as np
import paddle.inference as paddle_infer

from ner_compress.core import runtime
from ner_compress.core.errors import UserError
from ner_compress.core.static_files import PIR_PROGRAM, static_model_files
from ner_compress.data.window_scores import BUCKET, bucket_length
from ner_compress.deploy.inference import INPUT_NAMES, Tagger

# Paddle Inference on GPU: the precision of its CUDA kernels and, with TensorRT, of the engine it builds
# (passed through as documented by Paddle Inference; no GPU was available to test them here)
GPU_PRECISIONS = {"fp32": "Float32", "fp16": "Half"}
TENSORRT_WORKSPACE_BYTES = 1 << 30
TENSORRT_MIN_SUBGRAPH = 3  # smaller subgraphs stay on Paddle's kernels
# oneDNN stays on for CPU FP32 (Paddle 2.6.2's default). Measured on the demo exports, 2 threads,
# quiet machine, median ms per call after each shape was seen once, native -> oneDNN: teacher
# batch 1 2.81 -> 2.40, batch 32 44.2 -> 20.0, varied bucket lengths batch 1 5.12 -> 3.66, batch 32
# 70.8 -> 29.2; width 0.5 batch 1 2.56 -> 2.64 (a tie), batch 32 25.0 -> 12.0. What oneDNN costs is
# the first call of each new shape (primitive creation), hence ``warm_shapes``.
MKLDNN_CACHE_SHAPES = 64


def tensorrt_shapes(max_batch_size, max_seq_length):
    """TensorRT's dynamic-shape ranges (minimum, maximum, optimum) of each input: bucketed batches run
    from one sentence of one bucket to ``max_batch_size`` windows of ``max_seq_length``."""
    longest = bucket_length(max_seq_length, BUCKET)
    shapes = ([1, BUCKET], [max_batch_size, longest], [max_batch_size, max(BUCKET, longest // 2)])
    return tuple({name: list(shape) for name in INPUT_NAMES} for shape in shapes)


def check_gpu_build(tensorrt):
    """Refuse in one line a GPU predictor this paddlepaddle build cannot make."""
    runtime.require_cuda()
    if tensorrt and paddle_infer.get_trt_compile_version() == (0, 0, 0):
        raise UserError("--tensorrt: this paddlepaddle-gpu was built without TensorRT; install a TensorRT "
                        "build of paddlepaddle-gpu or drop --tensorrt")


def set_gpu(config, precision, tensorrt_ranges):
    """CUDA kernels at ``precision``; with ``tensorrt_ranges`` (``tensorrt_shapes``) a TensorRT engine too."""
    check_gpu_build(tensorrt_ranges is not None)
    kind = getattr(paddle_infer.PrecisionType, GPU_PRECISIONS[precision])
    config.enable_use_gpu(256, 0, kind)
    if tensorrt_ranges is not None:
        config.enable_tensorrt_engine(workspace_size=TENSORRT_WORKSPACE_BYTES,
                                      max_batch_size=tensorrt_ranges[1][INPUT_NAMES[0]][0],
                                      min_subgraph_size=TENSORRT_MIN_SUBGRAPH, precision_mode=kind,
                                      use_static=False, use_calib_mode=False)
        config.set_trt_dynamic_shape_info(*tensorrt_ranges)


def predictor_config(model_dir, device="cpu", threads=None, mkldnn=True, precision="fp32", tensorrt_ranges=None):
    """Paddle Inference settings (``mkldnn`` only matters on CPU; ``precision`` fp16 and
    ``tensorrt_ranges`` only on GPU)."""
    program, params = static_model_files(model_dir)
    config = paddle_infer.Config(program, params)
    if device == "gpu":
        set_gpu(config, precision, tensorrt_ranges)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
        if mkldnn:
            config.enable_mkldnn()
            # one primitive set per input shape: bucketed padding keeps the shapes to
            # max_seq_length / 16 lengths per batch size, which this capacity holds
            config.set_mkldnn_cache_capacity(MKLDNN_CACHE_SHAPES)
        else:
            config.disable_mkldnn()
    config.switch_ir_optim(True)
    if not program.endswith(PIR_PROGRAM):
        # Paddle 3.3.1 with a PIR program: create_predictor then fails ("Not find predictor_id 0
        # and pass_name memory_optimize_pass"; measured, legacy programs are fine)
        config.enable_memory_optim()
    # zero-copy handles: inputs are copied straight into the predictor's tensors, no feed/fetch ops
    config.switch_use_feed_fetch_ops(False)
    config.disable_glog_info()
    return config


class StaticTagger(Tagger):
    """Tags texts with an exported static model through Paddle Inference."""

    def __init__(self, model_dir, device="cpu", threads=None, mkldnn=True, batch_size=32, int8=False,
                 decoding="viterbi", bucket=True, precision="fp32", tensorrt=False):
        super().__init__(model_dir, batch_size, decoding, bucket)
        if int8:
            mkldnn = True  # the INT8 kernels are oneDNN's
        ranges = tensorrt_shapes(batch_size, self.max_seq_length) if tensorrt else None  # the meta's length
        config = predictor_config(model_dir, device, threads, mkldnn, precision, ranges)
        if int8 and device == "cpu":
            # INT8 kernels for the linear layers only: letting oneDNN also quantize the attention
            # matmuls (fused_matmul) dropped test F1 from 0.30 to 0.10 on the demo model, while
            # fake-quant simulation of the same calibration kept 0.298 (measured, Paddle 2.6.2)
            config.enable_mkldnn_int8({"fc"})
        self.predictor = paddle_infer.create_predictor(config)
        # handles looked up once: each lookup crosses into C++ and allocates a wrapper
        self.inputs = [(name, self.predictor.get_input_handle(name)) for name in self.predictor.get_input_names()]
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])
        if device == "cpu" and mkldnn:
            self.warm_shapes()

    def warm_shapes(self):
        """One batch-1 call per bucket length, so that oneDNN creates its primitives now rather than
        on a user's first sentence of each length (larger batches warm up on first use)."""
        if not self.bucket:
            return
        for length in range(self.bucket, bucket_length(self.max_seq_length, self.bucket) + 1, self.bucket):
            ids = np.full((1, length), self.encoder.pad_id, dtype="int64")
            self.logits(ids, np.zeros_like(ids))

    def logits(self, input_ids, token_type_ids):
        feeds = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        for name, handle in self.inputs:
            handle.reshape(feeds[name].shape)
            handle.copy_from_cpu(np.ascontiguousarray(feeds[name]))
        self.predictor.run()
        return self.output.copy_to_cpu()
