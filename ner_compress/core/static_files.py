"""Which files hold an exported static graph, on either supported Paddle.

``paddle.jit.save(layer, DIR/model)`` writes the program as ``model.json`` on Paddle 3.x (PIR,
the default there) or ``model.pdmodel`` on Paddle 2.6, and the weights as ``model.pdiparams``
on both. Paddle Inference, paddle2onnx, INT8 quantization and the manifests take the pair
from ``static_model_files``; Paddle 3 also reads a ``.pdmodel``, Paddle 2.6 cannot read a ``.json``.
"""
import os

from ner_compress.core.compat import PADDLE_VERSION, major
from ner_compress.core.errors import UserError

MODEL_PREFIX = "model"
PARAMS_FILE = MODEL_PREFIX + ".pdiparams"
PIR_PROGRAM = MODEL_PREFIX + ".json"
LEGACY_PROGRAM = MODEL_PREFIX + ".pdmodel"
PROGRAM_FILES = (PIR_PROGRAM, LEGACY_PROGRAM)


def program_file(static_dir):
    """The program file in ``static_dir`` (``None`` when there is none)."""
    return next((os.path.join(static_dir, name) for name in PROGRAM_FILES
                 if os.path.isfile(os.path.join(static_dir, name))), None)


def static_model_files(static_dir):
    """``(program, params)`` of the static graph in ``static_dir``, refused in one line when this
    Paddle cannot read it."""
    program = program_file(static_dir)
    if program is None:
        raise UserError(f"{static_dir}: not an exported static model (no {' or '.join(PROGRAM_FILES)}); "
                        f"run `python tools/export.py` first")
    if program.endswith(PIR_PROGRAM) and major(PADDLE_VERSION) < 3:
        raise UserError(f"{program}: made with Paddle 3.x (PIR program), which Paddle {PADDLE_VERSION} cannot "
                        f"read; re-export with this Paddle or install requirements.txt (Paddle 3)")
    return program, os.path.join(static_dir, PARAMS_FILE)
