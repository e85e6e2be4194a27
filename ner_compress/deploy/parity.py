"""Parity of an export: every graph written (dynamic, static, ONNX, fused) gives the logits of the model it
came from, within ``PARITY_TOLERANCE``; otherwise the export is refused, in one line."""
import numpy as np

from ner_compress.core.errors import UserError

PARITY_TOLERANCE = 1e-4


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def check_parity(reference_name, reference, others):
    """Every logits array in ``others`` within ``PARITY_TOLERANCE`` of ``reference``; otherwise a
    one-line refusal naming the output that drifted (the tools exit 2, no traceback)."""
    diffs = {name: max_abs_diff(reference, value) for name, value in others.items()}
    for name, diff in diffs.items():
        if not diff < PARITY_TOLERANCE:
            raise UserError(f"export parity failed: {name} differs from {reference_name} by {diff:.2e} "
                            f"(tolerance {PARITY_TOLERANCE:.0e}); the export is not written")
    return diffs
