"""A quiet console: our own progress lines, the warnings that concern the user, and the final table.

Third-party INFO lines and warnings known to be harmless here are silenced at their loggers and warning
filters, never by redirecting stderr (paddle2onnx's C++ progress on stdout, which has no level to set, is
relayed to a logger: ``stdout_lines_to``); ``--verbose`` (or ``NER_COMPRESS_VERBOSE=1``) leaves every library
as it set itself up and shows our ``detail`` lines too.

What each stage prints by default (tests/test_console.py counts them on the tiny pipeline):

- every tool: one line, the CPU and its math threads (once per process);
- vocabulary pruning: one line, the rows kept;
- a training stage: a progress bar (none when stages run side by side), the plan (parameters, windows, steps)
  and the best dev F1 per model; the student adds its shape and how it starts (one or two lines);
- reconstruction: one line per model refit, dev F1 before and after;
- export: one line per model (formats, parity, the INT8 copy kept), and a warning when INT8 is refused;
- the pipeline: one line when side by side, one before measuring, then the table;
- the benchmark: a progress bar, then its report (the targets met and missed among it).

Each logging step, dev score, INT8 configuration tried and parameter digest goes to ``detail``.
"""
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager

# our step-by-step lines: shown with --verbose only
detail = logging.getLogger("ner_compress.detail")

# warnings raised while the libraries import or run, harmless in this project
HARMLESS_WARNINGS = (
    "No ccache found",  # paddle.utils.cpp_extension: nothing is compiled here
    "Setuptools is replacing distutils",  # setuptools' shim, as paddle imports distutils
    "pkg_resources is deprecated",  # jieba, imported by paddlenlp
    "Tensor do not have 'place' interface",  # paddle.jit tracing the export graph
    # PaddleSlim's head importance reads gradients through a deprecated Paddle API
    r'(?s).*"paddle\.base\.dygraph\.tensor_patch_methods\.gradient" is deprecated',
)
# loggers whose warnings are expected here -> the level that still lets their errors through
HARMLESS_LOGGERS = {
    # "Input hidden size (192) is not same as weight matrix dimension of q,k,v (384)": a cut width, by design
    "fusion_attention": logging.ERROR,
    # "Please consider to run pre-processing before quantization": the export quantizes an optimized graph
    "onnxruntime.quantization.quantize": logging.ERROR,
}
# a relayed stdout line that names its level keeps it
MARKED_LEVELS = {"[ERROR]": logging.ERROR, "[WARNING]": logging.WARNING}
# Paddle's C++ log (glog): errors only; its warnings here are notices while an export traces the graph
GLOG_LEVEL = ("GLOG_minloglevel", "2")


def verbose():
    return "--verbose" in sys.argv[1:] or os.environ.get("NER_COMPRESS_VERBOSE") == "1"


def quiet_imports():
    """Before paddle loads (``import ner_compress``): the warnings above, glog's level, our detail lines."""
    if verbose():
        return
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault(*GLOG_LEVEL)  # a user's own setting wins
    detail.setLevel(logging.WARNING)


def expected_load_notice(record):
    """False for PaddleNLP's notices when a pretrained encoder gets our classifier: the pretraining heads it
    leaves out, and the classifier it initialises (any other missing weight still shows)."""
    text = record.getMessage()
    fresh_classifier = "newly initialized: ['classifier.weight', 'classifier.bias']" in text
    return not (text.startswith("Some weights of the model checkpoint at") or fresh_classifier)


def quiet_libraries():
    """After the libraries set up logging: paddle.distributed and PaddleNLP attach their handlers to the
    root logger at INFO, through which ONNX Runtime's optimizer and quantizer print a line per node."""
    if verbose():
        return
    logging.getLogger().setLevel(logging.WARNING)
    for name, level in HARMLESS_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    paddlenlp = logging.getLogger("PaddleNLP")
    paddlenlp.setLevel(logging.WARNING)  # its INFO: a line per file it loads
    if expected_load_notice not in paddlenlp.filters:
        paddlenlp.addFilter(expected_load_notice)


def quiet_onnx_export():
    """paddle2onnx's and Polygraphy's own loggers (not Python logging): warnings and errors only."""
    if verbose():
        return
    from paddle2onnx.utils import logging as paddle2onnx_logging

    paddle2onnx_logging.log_level = 1  # 0 error, 1 warning, 2 info
    try:  # paddle2onnx 2.x folds constants with Polygraphy; 1.x (the Paddle 2.6 stack) has none
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return
    G_LOGGER.module_severity = G_LOGGER.WARNING


@contextmanager
def stdout_lines_to(logger_name):
    """paddle2onnx's C++ converter prints its progress to stdout with no level to set: during the block, what
    reaches file descriptor 1 goes to ``logger_name``, at INFO (shown with --verbose) unless the line names its
    level (``[WARNING]``, ``[ERROR]``: its Python log), which it keeps. Its C++ errors go to stderr, left alone."""
    if verbose():
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                level = next((lvl for mark, lvl in MARKED_LEVELS.items() if mark in line), logging.INFO)
                logging.getLogger(logger_name).log(level, line)
