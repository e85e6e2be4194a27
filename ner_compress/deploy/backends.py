"""Inference backends behind one ``Tagger`` interface: Paddle Inference, ONNX Runtime, dynamic graph.

Each backend only implements ``logits(input_ids, token_type_ids) -> numpy``; windowing,
bucketed padding, decoding and entity extraction live in ``inference.Tagger``. ``load_tagger``
picks one by name; ``DEFAULT_BACKEND`` is the faster one on CPU as measured (README, "Backends").
This module imports no paddle: Paddle Inference (``paddle_inference``) and the dynamic graph load on
demand, so ONNX Runtime predicts and serves in the deploy install (requirements-serve.txt).
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from ner_compress.core import compat, console
from ner_compress.core.options import flag_field
from ner_compress.core.errors import UserError
from ner_compress.deploy.inference import INPUT_NAMES, Tagger, read_meta  # noqa: F401  (INPUT_NAMES: re-exported)
from ner_compress.core.static_files import static_model_files

BACKENDS = ("paddle", "onnxruntime")
DEFAULT_BACKEND = "onnxruntime"
ONNX_DIR, ONNX_FILE = "onnx", "model.onnx"  # paddle2onnx's graph: standard ONNX ops, any runtime
FUSED_FILE = "model.opt.onnx"  # the same graph after ONNX Runtime's transformer fusions (its contrib ops)
INT8_FILE = "model.int8.onnx"  # ner_compress.deploy.onnx_quant's INT8 copy of the fused graph
PRECISIONS = ("fp32", "fp16", "int8")
# Paddle Inference's names, still importable from here: ``__getattr__`` loads them (and paddle) on first use
PADDLE_INFERENCE_NAMES = ("StaticTagger", "predictor_config", "tensorrt_shapes", "set_gpu", "check_gpu_build",
                          "GPU_PRECISIONS", "MKLDNN_CACHE_SHAPES")


def paddle_backend():
    """The Paddle Inference backend module, refused in one line where paddle is not installed."""
    if compat.PADDLE_VERSION is None:
        raise UserError("--backend paddle: paddlepaddle is not installed here (the deploy install, "
                        "requirements-serve.txt, runs ONNX Runtime only); install the full stack with "
                        "`pip install -r requirements.txt`, or use --backend onnxruntime on --device cpu")
    from ner_compress.deploy import paddle_inference as module

    return module


def __getattr__(name):
    if name in PADDLE_INFERENCE_NAMES:
        return getattr(paddle_backend(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export_onnx(static_dir, onnx_path):
    import paddle2onnx

    program, params = static_model_files(static_dir)
    console.quiet_onnx_export()
    with compat.polygraphy_without_installs(), console.stdout_lines_to("paddle2onnx"):
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
    # memory patterns are planned per input shape and kept: with texts of every length they held 23 MB more
    # (width 0.5: 194 -> 171 MB after 200 requests) for no measurable speed (1043 vs 1075 ms on mixed batches)
    options.enable_mem_pattern = False
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
    if backend == "paddle":
        paddle_backend()  # installed, or refused naming the install it needs


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
        return paddle_backend().StaticTagger(model_dir, device=device, threads=threads, batch_size=batch_size,
                                             decoding=decoding, precision=precision, tensorrt=tensorrt)
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
