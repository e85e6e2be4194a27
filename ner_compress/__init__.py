"""ner_compress: shrink a Chinese NER BERT with a once-for-all width supernet.

Stages: ``training`` (teacher), ``supernet`` (OFA distillation), ``export``
(sub-model to dynamic and static graph and ONNX), ``inference`` (Paddle Inference, ONNX Runtime).
"""
from ner_compress.core import console, runtime

runtime.prepare_environment()  # before paddle loads: MKL reads its settings once
console.quiet_imports()  # before paddle loads: its import-time warnings

from ner_compress.core import compat  # noqa: E402,F401  (works around a zlib clash before paddle loads)

__version__ = "0.1.0"
