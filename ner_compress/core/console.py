"""A quiet console: our own progress lines, the warnings that concern the user, and the final table.

Third-party INFO lines and warnings known to be harmless here are silenced at their loggers and warning
filters, never by redirecting a stream; ``--verbose`` (or ``NER_COMPRESS_VERBOSE=1``) leaves every library
as it set itself up.
"""
import logging
import os
import sys
import warnings

# warnings raised while the libraries import, harmless in this project
HARMLESS_WARNINGS = (
    "No ccache found",  # paddle.utils.cpp_extension: nothing is compiled here
    "Setuptools is replacing distutils",  # setuptools' shim, as paddle imports distutils
    "pkg_resources is deprecated",  # jieba, imported by paddlenlp
)
# loggers whose warnings are expected here -> the level that still lets their errors through
HARMLESS_LOGGERS = {
    # "Input hidden size (192) is not same as weight matrix dimension of q,k,v (384)": a cut width, by design
    "fusion_attention": logging.ERROR,
    # "Please consider to run pre-processing before quantization": the export quantizes an optimized graph
    "onnxruntime.quantization.quantize": logging.ERROR,
}


def verbose():
    return "--verbose" in sys.argv[1:] or os.environ.get("NER_COMPRESS_VERBOSE") == "1"


def quiet_imports():
    """Before paddle loads (``import ner_compress``): the import-time warnings above."""
    if not verbose():
        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)


def quiet_libraries():
    """After the libraries set up logging: paddle.distributed and PaddleNLP attach their handlers to the
    root logger at INFO, through which ONNX Runtime's optimizer and quantizer print a line per node."""
    if verbose():
        return
    logging.getLogger().setLevel(logging.WARNING)
    for name, level in HARMLESS_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


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
