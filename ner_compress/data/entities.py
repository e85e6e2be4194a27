"""Entities from BIO tags, as conlleval (and seqeval's ``get_entities``) read them, in plain Python.

The deploy install (requirements-serve.txt) has no seqeval, whose import pulls scikit-learn and SciPy;
``tests/test_metrics.py`` checks these spans against seqeval's on every kind of tag sequence.
"""


def entity_spans(tags):
    """``[(type, first, last)]`` of BIO ``tags``, ``last`` inclusive. An ``I-X`` that does not continue an
    ``X`` entity (after ``O``, another type, or at the start) begins one, as in conlleval."""
    spans, kind, first = [], None, 0
    for i, tag in enumerate([*tags, "O"]):
        continues = tag.startswith("I-") and tag[2:] == kind
        if kind is not None and not continues:
            spans.append((kind, first, i - 1))
            kind = None
        if tag != "O" and not continues:
            kind, first = tag[2:], i
    return spans


def extract_entities(text, tags):
    """``[{type, start, end, text}]`` with ``end`` exclusive, so ``text[start:end]`` is the entity."""
    return [{"type": kind, "start": start, "end": end + 1, "text": text[start: end + 1]}
            for kind, start, end in entity_spans(tags)]
