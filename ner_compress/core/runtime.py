"""Runtime settings: the GPU build check, MKL's fast path on AMD processors and the number of math threads.

Paddle's CPU wheel bundles an MKL that picks a slow generic kernel on non-Intel CPUs unless
``MKL_DEBUG_CPU_TYPE=5`` is in the environment before it loads (measured on a 2-core AMD EPYC:
a 2048x512x2048 matmul at 34 GFLOP/s without it, 116 with it and 2 threads). Dynamic-graph ops
also run on one thread unless told otherwise. ``prepare_environment`` runs from
``ner_compress/__init__`` before paddle is imported; ``set_cpu_threads`` once a tool knows
``--cpu_threads``. Set ``NER_COMPRESS_MKL_FIX=0`` to measure without the MKL setting.
"""
import logging
import os
import sys

from ner_compress.core import console
from ner_compress.core.errors import UserError

log = logging.getLogger("ner_compress")
MKL_VARIABLE = "MKL_DEBUG_CPU_TYPE"
_STATE = {"mkl_fix": None, "threads": None, "logged": False}


def setup_logging(level=logging.INFO):
    """Our lines on stderr in one format, for every tool and the server (``level``: a number or a name).

    Of several training processes only rank 0 logs below WARNING; PaddleNLP's per-file notices only at
    WARNING (when it is loaded: the deploy install has no Paddle)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel((level.upper() if isinstance(level, str) else level) if _is_writer() else logging.WARNING)
    log.propagate = False
    if "paddlenlp" in sys.modules:
        from paddlenlp.utils.log import logger as paddlenlp_logger

        paddlenlp_logger.set_level("WARNING")
    console.quiet_libraries()


def _is_writer():
    if "paddle" not in sys.modules:  # no process group without paddle
        return True
    from ner_compress.core import parallel

    return parallel.is_writer()


def cpuinfo_field(name, default=""):
    """The first ``name : value`` of /proc/cpuinfo (``vendor_id``, ``model name``), else ``default``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.split(":", 1)[0].strip() == name),
                        default)
    except OSError:
        return default


def cpu_vendor():
    return cpuinfo_field("vendor_id")


def prepare_environment():
    """Before paddle loads: ask MKL for its AVX2 kernels on AMD (a user's own setting wins)."""
    if os.environ.get("NER_COMPRESS_MKL_FIX", "1") == "0" or MKL_VARIABLE in os.environ:
        _STATE["mkl_fix"] = False
        return
    if cpu_vendor() == "AuthenticAMD":
        os.environ[MKL_VARIABLE] = "5"
        _STATE["mkl_fix"] = True


def openmp_threads():
    """Threads of the OpenMP runtime paddle's MKL uses, read back from the loaded library."""
    from threadpoolctl import threadpool_info

    found = [p["num_threads"] for p in threadpool_info() if p.get("prefix") == "libiomp"]
    return found[0] if found else None


def require_cuda():
    """Refuse ``--device gpu`` in one line on a paddlepaddle built without CUDA."""
    import paddle

    if not paddle.device.is_compiled_with_cuda():
        raise UserError("--device gpu: this paddlepaddle has no CUDA; install the stack's paddlepaddle-gpu "
                        "(docs/stacks.md) or use --device cpu")


def set_cpu_threads(threads=None):
    """Math threads of dynamic-graph CPU ops: ``threads`` or every core."""
    from paddle.base import core

    n = int(threads or os.cpu_count() or 1)
    core.set_num_threads(n)
    _STATE["threads"] = n
    return n


def report():
    """What is in force in this process (read back where the runtime can say)."""
    return {"cpu_vendor": cpu_vendor(), "cpu_threads": _STATE["threads"], "openmp_threads": openmp_threads(),
            MKL_VARIABLE: os.environ.get(MKL_VARIABLE), "mkl_fix_applied": bool(_STATE["mkl_fix"])}


def log_once():
    if _STATE["logged"]:
        return
    _STATE["logged"] = True
    info = report()
    log.info("cpu: %s, %s math threads (OpenMP reads back %s), %s=%s%s", info["cpu_vendor"] or "unknown vendor",
             info["cpu_threads"], info["openmp_threads"], MKL_VARIABLE, info[MKL_VARIABLE],
             " (set here: MKL's AVX2 path on AMD)" if info["mkl_fix_applied"] else "")
