"""BIO-constrained Viterbi, and one decoding path for evaluation and prediction."""
import itertools

import numpy as np
import pytest

from conftest import TINY_LABELS
from ner_compress.data import decoding
from ner_compress.data import window_scores
from ner_compress.deploy import inference
from ner_compress.data.vocab import CharEncoder, load_vocab
from ner_compress.data.corpus import Sentence
from ner_compress.data.decoding import Decoder


def valid_bio(tags):
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            return False
        prev = tag
    return True


def test_viterbi_never_emits_an_inside_tag_that_continues_nothing():
    rng = np.random.RandomState(0)
    decoder = Decoder(TINY_LABELS)
    invalid_argmax = 0
    for _ in range(300):
        scores = decoding.log_softmax(rng.randn(rng.randint(1, 30), len(TINY_LABELS)) * 3)
        tags = decoder(scores)
        assert len(tags) == len(scores) and valid_bio(tags)
        invalid_argmax += not valid_bio([TINY_LABELS[i] for i in scores.argmax(-1)])
    assert invalid_argmax > 100  # argmax alone was invalid often: the constraint did work


def test_viterbi_equals_argmax_when_argmax_is_valid():
    """The routine itself, not ``Decoder``, which returns a valid argmax without running Viterbi."""
    rng = np.random.RandomState(1)
    allowed, start = decoding.bio_constraints(TINY_LABELS)
    checked = 0
    for _ in range(500):
        scores = decoding.log_softmax(rng.randn(rng.randint(1, 12), len(TINY_LABELS)) * 3)
        argmax = scores.argmax(-1)
        if valid_bio([TINY_LABELS[i] for i in argmax]):
            checked += 1
            assert decoding.viterbi(scores, allowed, start).tolist() == argmax.tolist()
    assert checked > 50


def test_viterbi_is_the_best_valid_path_by_brute_force():
    rng = np.random.RandomState(2)
    labels = ["O", "B-X", "I-X", "B-Y", "I-Y"]
    decoder = Decoder(labels)
    for _ in range(20):
        scores = decoding.log_softmax(rng.randn(4, len(labels)) * 2)
        paths = [p for p in itertools.product(range(len(labels)), repeat=4)
                 if valid_bio([labels[i] for i in p])]
        best = max(paths, key=lambda p: scores[np.arange(4), p].sum())
        assert decoder(scores) == [labels[i] for i in best]


def test_unknown_decoding_is_refused_with_the_flag():
    from ner_compress.core.errors import UserError

    with pytest.raises(UserError, match="--decoding beam"):
        Decoder(TINY_LABELS, "beam")


class ContextTagger(inference.Tagger):
    """A fake model that tags 京 as I-LOC only when 北 is right before it in the same window,
    and 北 as B-LOC only when 京 follows: context at a window edge decides the entity."""

    def __init__(self, vocab, max_seq_length):  # no model directory: only what Tagger needs
        self.labels = TINY_LABELS
        self.max_seq_length = max_seq_length
        self.encoder = CharEncoder(vocab)
        self.batch_size = 4
        self.bucket = window_scores.BUCKET
        self.decoder = Decoder(self.labels, "argmax")
        self.bei, self.jing = vocab["北"], vocab["京"]

    def logits(self, input_ids, token_type_ids):
        out = np.zeros(input_ids.shape + (len(TINY_LABELS),), dtype="float32")
        out[..., 0] = 1.0
        prev = np.pad(input_ids, ((0, 0), (1, 0)))[:, :-1]
        nxt = np.pad(input_ids, ((0, 0), (0, 1)))[:, 1:]
        out[(input_ids == self.bei) & (nxt == self.jing), TINY_LABELS.index("B-LOC")] = 5.0
        out[(input_ids == self.jing) & (prev == self.bei), TINY_LABELS.index("I-LOC")] = 5.0
        return out


@pytest.mark.parametrize("offset", range(0, 16))
def test_entity_across_a_window_boundary_is_recovered_whole(vocab_file, offset):
    """Max length 18 (16 characters a window): 北京 at every offset, across every edge."""
    tagger = ContextTagger(load_vocab(vocab_file), 18)
    text = "我" * (14 + offset) + "北京" + "我" * 30
    (result,) = tagger.predict([text])
    assert result["entities"] == [{"type": "LOC", "start": 14 + offset, "end": 16 + offset, "text": "北京"}]


def test_evaluation_and_prediction_decode_the_same_way(vocab_file):
    """training.evaluate (dev F1) and Tagger.predict (predict.py, the server) give the same entities."""
    from types import SimpleNamespace

    from ner_compress.data.entities import extract_entities
    from ner_compress.compress.training import evaluate

    vocab = load_vocab(vocab_file)
    tagger = ContextTagger(vocab, 18)
    tagger.decoder = Decoder(TINY_LABELS, "viterbi")
    texts = ["我在北京", "北京北京我北", "京北京" * 9]
    dev = [Sentence(list(t), ["O"] * len(t)) for t in texts]
    fake = SimpleNamespace(splits=SimpleNamespace(dev=dev), encoder=tagger.encoder, labels=TINY_LABELS,
                           label_to_id={label: i for i, label in enumerate(TINY_LABELS)})
    scores = evaluate(tagger.logits, fake, tagger.windows(dev), 4, "viterbi")
    predicted = tagger.predict(texts)
    assert scores["predicted"] == sum(len(r["entities"]) for r in predicted) > 3
    tags = window_scores.tag_sentences(tagger.logits, dev, tagger.windows(dev), 4, tagger.encoder.pad_id,
                                   tagger.decoder)
    assert [extract_entities(t, g) for t, g in zip(texts, tags)] == [r["entities"] for r in predicted]
