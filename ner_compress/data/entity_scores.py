"""Entity-level scores (seqeval, conlleval semantics); entities for output are ``entities``'s."""
import warnings

from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities


def entity_scores(true_tags, pred_tags):
    """Micro precision/recall/F1 over whole sentences, plus the same per entity type."""
    with warnings.catch_warnings():
        # no entity in true_tags (an untrained model's as reference): seqeval's macro and weighted averages are
        # means of nothing (nan, unused here; the micro average is 0 by zero_division)
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
    per_type = {
        name: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
               "support": int(v["support"])}
        for name, v in report.items() if not name.endswith(" avg")
    }
    predicted = sum(len(get_entities(list(tags))) for tags in pred_tags)
    return {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "f1": float(micro["f1-score"]), "support": int(micro["support"]), "predicted": predicted,
            "per_type": per_type}

