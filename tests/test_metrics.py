"""Entity-level scores against hand counts, and entity extraction for output."""
import itertools

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from ner_compress.data.entities import entity_spans, extract_entities
from ner_compress.data.entity_scores import entity_scores


def f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0


def test_three_gold_two_predicted_one_correct():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O", "B-LOC", "O", "O"]]  # PER right, LOC in the wrong place, ORG missed
    s = entity_scores(gold, pred)
    assert s["precision"] == pytest.approx(1 / 2)
    assert s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(f1(1 / 2, 1 / 3)) and s["f1"] == pytest.approx(0.4)
    assert s["support"] == 3
    per = s["per_type"]
    assert set(per) == {"PER", "LOC", "ORG"}
    assert per["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_micro_average_counts_over_sentences():
    gold = [["B-PER", "I-PER", "O"], ["B-LOC", "O", "B-LOC"], ["O", "O"]]
    pred = [["B-PER", "I-PER", "O"], ["B-LOC", "O", "O"], ["B-ORG", "O"]]
    # gold 3 (PER, LOC, LOC); predicted 3 (PER, LOC, ORG); correct 2
    s = entity_scores(gold, pred)
    assert (s["precision"], s["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["per_type"]["LOC"]["recall"] == pytest.approx(1 / 2)
    assert s["per_type"]["LOC"]["precision"] == pytest.approx(1.0)
    assert s["per_type"]["ORG"]["precision"] == 0.0 and s["per_type"]["ORG"]["support"] == 0


@pytest.mark.parametrize("pred", [
    ["B-PER", "I-PER", "O", "O"],  # too short
    ["B-PER", "I-PER", "I-PER", "I-PER"],  # too long
    ["O", "B-PER", "I-PER", "O"],  # shifted
    ["B-LOC", "I-LOC", "I-LOC", "O"],  # right span, wrong type
    ["B-PER", "B-PER", "I-PER", "O"],  # split in two
])
def test_boundary_or_type_mismatch_counts_as_wrong(pred):
    s = entity_scores([["B-PER", "I-PER", "I-PER", "O"]], [pred])
    assert s["f1"] == 0.0 and s["recall"] == 0.0 and s["precision"] == 0.0


def test_perfect_prediction():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    s = entity_scores(gold, [list(t) for t in gold])
    assert (s["precision"], s["recall"], s["f1"], s["support"]) == (1.0, 1.0, 1.0, 3)
    assert all(v["f1"] == 1.0 for v in s["per_type"].values())


def test_no_entities_at_all_scores_zero_not_error():
    s = entity_scores([["O", "O"]], [["O", "O"]])
    assert (s["precision"], s["recall"], s["f1"], s["support"]) == (0.0, 0.0, 0.0, 0)


def test_conlleval_reads_i_after_o_as_a_start():
    s = entity_scores([["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]])
    assert s["f1"] == 1.0


def _check_spans(text, entities):
    for e in entities:
        assert e["text"] == text[e["start"]:e["end"]]


def test_extract_entities_with_entity_at_the_end():
    text = "张三在北京"
    ents = extract_entities(text, ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"])
    assert ents == [{"type": "PER", "start": 0, "end": 2, "text": "张三"},
                    {"type": "LOC", "start": 3, "end": 5, "text": "北京"}]
    _check_spans(text, ents)


def test_extract_single_char_entity_at_the_end():
    text = "住在京"
    ents = extract_entities(text, ["O", "O", "B-LOC"])
    assert ents == [{"type": "LOC", "start": 2, "end": 3, "text": "京"}]
    _check_spans(text, ents)


def test_extract_adjacent_entities():
    text = "张李说"
    ents = extract_entities(text, ["B-PER", "B-PER", "O"])
    assert [(e["type"], e["start"], e["end"], e["text"]) for e in ents] == [("PER", 0, 1, "张"), ("PER", 1, 2, "李")]
    _check_spans(text, ents)

    text = "北京大学"
    ents = extract_entities(text, ["B-LOC", "I-LOC", "B-ORG", "I-ORG"])
    assert [(e["type"], e["text"]) for e in ents] == [("LOC", "北京"), ("ORG", "大学")]
    _check_spans(text, ents)


def test_extract_nothing():
    assert extract_entities("你好", ["O", "O"]) == []


def test_entity_spans_are_seqevals_on_every_tag_sequence_up_to_five():
    """Every sequence over O and B-/I- of two types (invalid BIO included: argmax decoding emits it)."""
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for n in range(6):
        for seq in itertools.product(tags, repeat=n):
            assert entity_spans(seq) == get_entities(list(seq)), seq
