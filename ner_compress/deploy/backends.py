"""Inference backends behind one ``Tagger`` interface: Paddle Inference, ONNX Runtime, dynamic graph.

Each backend only implements ``logits(input_ids, token_type_ids) -> numpy``; windowing,
bucketed padding, decoding and entity extraction live in ``inference.Tagger``. ``load_tagger``
picks one by name; ``DEFAULT_BACKEND`` is the faster one on CPU as measured (README, "Backends").
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import paddle.inference as paddle_infer

from ner_compress.core import compat, runtime
from ner_compress.core.config import flag_field
from ner_compress.core.errors import UserError
from ner_compress.data.window_scores import BUCKET, bucket_length
from ner_compress.deploy.inference import Tagger, read_meta
from ner_compress.core.static_files import PIR_PROGRAM, static_model_files

BACKENDS = ("paddle", "onnxruntime")
DEFAULT_BACKEND = "onnxruntime"
ONNX_DIR, ONNX_FILE = "onnx", "model.onnx"  # paddle2onnx's graph: standard ONNX ops, any runtime
FUSED_FILE = "model.opt.onnx"  # the same graph after ONNX Runtime's transformer fusions (its contrib ops)
INT8_FILE = "model.int8.onnx"  # ner_compress.deploy.onnx_quant's INT8 copy of the fused graph
PRECISIONS = ("fp32", "fp16", "int8")
# Paddle Inference on GPU: the precision of its CUDA kernels and, with TensorRT, of the engine it builds
# (passed through as documented by Paddle Inference; no GPU was available to test them here)
GPU_PRECISIONS = {"fp32": "Float32", "fp16": "Half"}
TENSORRT_WORKSPACE_BYTES = 1 << 30
TENSORRT_MIN_SUBGRAPH = 3  # smaller subgraphs stay on Paddle's kernels
INPUT_NAMES = ("input_ids", "token_type_ids")
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


def export_onnx(static_dir, onnx_path):
    import paddle2onnx

    program, params = static_model_files(static_dir)
    with compat.polygraphy_without_installs():
        paddle2onnx.export(program, params, save_file=onnx_path, opset_version=13, enable_onnx_checker=True)
    return onnx_path


def onnx_path_for(static_dir, precision="fp32"):
    """The graph ONNX Runtime runs, in ``<export>/onnx/`` beside ``<export>/static``: for fp32 the fused
    graph when the export wrote one (else ``model.onnx``), for int8 ``model.int8.onnx``."""
    directory = os.path.join(os.path.dirname(os.path.abspath(static_dir)), ONNX_DIR)
    if precision == "int8":
        return os.path.join(directory, INT8_FILE)
    fused = os.path.join(directory, FUSED_FILE)
    return fused if os.path.isfile(fused) else os.path.join(directory, ONNX_FILE)


def ort_session_options(threads=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: no inter-op pool
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    return options


class OnnxTagger(Tagger):
    """The same static model converted by paddle2onnx, run by ONNX Runtime."""

    def __init__(self, static_dir, onnx_path=None, threads=None, batch_size=32, decoding="viterbi", bucket=True,
                 options=None, precision="fp32"):
        import onnxruntime as ort

        super().__init__(static_dir, batch_size, decoding, bucket)
        self.session = ort.InferenceSession(onnx_path or onnx_path_for(static_dir, precision),
                                            options or ort_session_options(threads),
                                            providers=["CPUExecutionProvider"])

    def logits(self, input_ids, token_type_ids):
        return self.session.run(None, {"input_ids": input_ids, "token_type_ids": token_type_ids})[0]


class DynamicTagger(Tagger):
    """The exported dynamic-graph model, for the static-vs-dynamic comparison."""

    def __init__(self, export_dir, batch_size=32, decoding="viterbi"):
        from ner_compress.models.families import model_class_for  # PaddleNLP: only this backend needs it

        super().__init__(os.path.join(export_dir, "static"), batch_size, decoding)
        dynamic = os.path.join(export_dir, "dynamic")
        self.model = model_class_for(dynamic).from_pretrained(dynamic)
        self.model.eval()

    def logits(self, input_ids, token_type_ids):
        from ner_compress.models.modeling import numpy_logits

        return numpy_logits(self.model, input_ids, token_type_ids)


def check_engine(backend, device, precision, tensorrt):
    """Refuse a backend, device, precision and TensorRT choice that do not go together, in one line."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: unknown; use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: unknown; use one of {', '.join(PRECISIONS)}")
    if backend == "onnxruntime" and device != "cpu":
        raise UserError(f"--backend onnxruntime: CPU only here; use --backend paddle with --device {device}")
    if precision == "int8" and backend != "onnxruntime":
        raise UserError("--precision int8: ONNX Runtime's export only; use --backend onnxruntime "
                        "(Paddle Inference INT8 is measured by tools/benchmark.py)")
    gpu_paddle = backend == "paddle" and device == "gpu"
    if precision == "fp16" and not gpu_paddle:
        raise UserError("--precision fp16: Paddle Inference on GPU only; use --backend paddle --device gpu")
    if tensorrt and not gpu_paddle:
        raise UserError("--tensorrt: Paddle Inference on GPU only; use --backend paddle --device gpu")


def check_backend(backend, model_dir, precision="fp32", device="cpu", tensorrt=False):
    """Refuse an unknown or mismatched engine (``check_engine``), or ONNX Runtime without its exported
    file, in one line."""
    check_engine(backend, device, precision, tensorrt)
    read_meta(model_dir)  # a wrong --model_dir is named as such, not as a missing ONNX file
    if backend == "paddle":
        static_model_files(model_dir)  # a program this Paddle cannot read is refused now, in one line
    path = onnx_path_for(model_dir, precision)
    if backend == "onnxruntime" and not os.path.isfile(path):
        how = "with onnx_int8 on (the export's manifest says why it was refused)" if precision == "int8" else \
            "(it writes onnx/ beside static/) or use --backend paddle"
        raise UserError(f"--backend onnxruntime: no {path}; re-export with `python tools/export.py` {how}")


def default_backend(device):
    """The backend used when none is named: ONNX Runtime on CPU (``DEFAULT_BACKEND``), Paddle
    Inference on GPU (ONNX Runtime runs on CPU only here)."""
    return DEFAULT_BACKEND if device == "cpu" else "paddle"


def load_tagger(model_dir, backend=None, device="cpu", threads=None, batch_size=32, decoding="viterbi",
                precision="fp32", tensorrt=False):
    """A ready ``Tagger`` over an exported static directory (``DIR/export/<model>/static``);
    ``backend=None``: ``default_backend(device)``; ``precision`` int8: ONNX Runtime's INT8 copy, fp16 (and
    ``tensorrt``): Paddle Inference on GPU."""
    backend = backend or default_backend(device)
    check_backend(backend, model_dir, precision, device, tensorrt)
    if backend == "paddle":
        return StaticTagger(model_dir, device=device, threads=threads, batch_size=batch_size, decoding=decoding,
                            precision=precision, tensorrt=tensorrt)
    return OnnxTagger(model_dir, threads=threads, batch_size=batch_size, decoding=decoding, precision=precision)


@dataclass
class EngineOptions:
    """How an exported model runs: the flags ``tools/predict.py`` and ``tools/serve.py`` share
    (``config.add_dataclass_flags``)."""
    model_dir: str = field(metadata={"help": "DIR/export/<model>/static (e.g. output/export/width_0.5/static)"})
    backend: Optional[str] = flag_field(None, "onnxruntime or paddle (Paddle Inference); default: onnxruntime "
                                        "on CPU, paddle on GPU")
    device: str = flag_field("cpu", "cpu or gpu", choices=["cpu", "gpu"])
    precision: str = flag_field("fp32", "fp32 (ONNX Runtime: the fused graph), int8 (ONNX Runtime's "
                                "model.int8.onnx from tools/export.py) or fp16 (Paddle Inference on GPU)")
    tensorrt: bool = flag_field(False, "Paddle Inference on GPU: run through a TensorRT engine at --precision")
    cpu_threads: Optional[int] = flag_field(None, "predictor math threads; default: all cores")
    decoding: str = flag_field("viterbi", "viterbi (BIO-constrained) or argmax")

    def __post_init__(self):
        if self.backend is None:
            self.backend = default_backend(self.device)

    def check(self):
        check_backend(self.backend, self.model_dir, self.precision, self.device, self.tensorrt)

    def tagger(self, batch_size):
        return load_tagger(self.model_dir, self.backend, self.device, self.cpu_threads, batch_size, self.decoding,
                           self.precision, self.tensorrt)
