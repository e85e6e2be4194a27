"""Streaming text input for prediction: bounded memory, one result or one error line per input line.

Lines are read as bytes in batches; a line that is not UTF-8 or is too long becomes an
error record for that line and the rest of the file goes on.
"""
DEFAULT_MAX_CHARS = 100_000  # longer lines are refused per line, not by the run


def read_lines(stream, batch_size, max_chars=DEFAULT_MAX_CHARS):
    """Yield lists of (line number, text or None, error or None), ``batch_size`` lines at a time."""
    batch = []
    for lineno, raw in enumerate(stream, 1):
        text, error = None, None
        raw = raw.rstrip(b"\r\n")
        if len(raw) > 4 * max_chars:
            error = f"line longer than {max_chars} characters; split it"
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                error = f"not valid UTF-8 at byte {err.start}"
            if text is not None and len(text) > max_chars:
                text, error = None, f"line longer than {max_chars} characters; split it"
        batch.append((lineno, text, error))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
