"""Streaming text input for prediction: bounded memory, one result or one error line per input line.

Lines are read as bytes with a length cap; a line that is not UTF-8 or is too long becomes an
error record for that line (its excess is skipped without being held in memory) and the rest of
the file goes on.
"""
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

from ner_compress.core.options import flag_field
from ner_compress.core.errors import UserError

DEFAULT_MAX_CHARS = 100_000  # longer lines are refused per line, not by the run


@dataclass
class PredictOptions:
    """What ``tools/predict.py`` tags, ``--text`` or ``--input_file``, and in what batches."""
    text: Optional[List[str]] = flag_field(None, "a text to tag (repeatable)", action="append", one_of="input")
    input_file: Optional[str] = flag_field(None, "UTF-8 file, one text per line; '-' for stdin", one_of="input")
    batch_size: int = flag_field(32, "texts per model call (--input_file)")
    max_chars: int = flag_field(DEFAULT_MAX_CHARS, "longest line accepted")
_CHUNK = 1 << 20


def _bounded_lines(stream, max_bytes):
    """(raw line without newline, too long?) pairs, never holding more than ``max_bytes`` + 1 MiB."""
    while True:
        raw = stream.readline(max_bytes + 1)
        if not raw:
            return
        too_long = len(raw) > max_bytes and not raw.endswith(b"\n")
        while too_long and not raw.endswith(b"\n"):
            raw = stream.readline(_CHUNK)  # drain the rest of the line
            if not raw:
                break
        yield (b"" if too_long else raw.rstrip(b"\r\n")), too_long


def read_lines(stream, batch_size, max_chars=DEFAULT_MAX_CHARS):
    """Yield lists of (line number, text or None, error or None), ``batch_size`` lines at a time."""
    batch = []
    too_long_error = f"line longer than {max_chars} characters; split it"
    for lineno, (raw, too_long) in enumerate(_bounded_lines(stream, 4 * max_chars), 1):
        text, error = None, None
        if too_long:
            error = too_long_error
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                error = f"not valid UTF-8 at byte {err.start}"
            if text is not None and len(text) > max_chars:
                text, error = None, too_long_error
        batch.append((lineno, text, error))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def emit(records):
    for record in records:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def tag_batch(tagger, batch):
    texts = [text for _, text, error in batch if error is None]
    results = iter(tagger.predict(texts))
    out = []
    for lineno, text, error in batch:
        out.append({"line": lineno, "error": error} if error else {"line": lineno, **next(results)})
    return out


def tag_input(tagger, input_file, batch_size, max_chars):
    """Tag a UTF-8 file ('-': stdin) line by line, writing one JSON record per line as its batch is done."""
    if input_file != "-" and not os.path.isfile(input_file):
        raise UserError(f"--input_file {input_file}: no such file")
    stream = sys.stdin.buffer if input_file == "-" else open(input_file, "rb")
    with stream:
        for batch in read_lines(stream, batch_size, max_chars):
            emit(tag_batch(tagger, batch))


def predict(opts, engine):
    """Tag the texts ``opts`` names with the model ``engine`` (``backends.EngineOptions``) loads: one JSON
    record per text on stdout."""
    tagger = engine.tagger(opts.batch_size)
    if opts.text:
        emit(tagger.predict(opts.text))
    else:
        tag_input(tagger, opts.input_file, opts.batch_size, opts.max_chars)
