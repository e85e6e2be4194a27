"""The four tools as a user runs them, on configs/tiny.yaml: the shared tiny run (conftest), or a directory of
the test's own."""
import json
import os

import pytest
from conftest import TINY, TINY_LABELS, export_vs_supernet_diff, exported_dir, file_stats, trained_dir
from conftest import run_tool as tool


def last_line(text):
    return text.strip().splitlines()[-1]


def test_stages_leave_self_describing_artifacts(tiny_run):
    teacher = json.load(open(trained_dir(tiny_run) / "manifest.json"))
    assert teacher["stage"] == "teacher"
    assert teacher["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert teacher["config"]["hidden_size"] == 64 and teacher["config"]["train_limit"] == 400
    assert "model.safetensors" in teacher["weights_sha256"]
    ofa = json.load(open(trained_dir(tiny_run, width=0.5) / "manifest.json"))
    assert ofa["width_mult"] == 0.5
    assert ofa["config"]["hidden_size"] == 64  # inherited, not the 768 default
    assert ofa["inputs"]["teacher"]["weights_sha256"] == teacher["weights_sha256"]
    assert ofa["effective_width_mult"] == 0.5 and ofa["heads"] == 2 and ofa["num_heads"] == 4
    assert teacher["runtime"]["cpu_threads"] == os.cpu_count() and teacher["speed"]["train_sentences_per_s"] > 0
    assert not [p for p in os.listdir(tiny_run) if ".partial-" in p]


def test_exported_width_predicts_as_the_supernet_on_test_sentences(tiny_run):
    windows, diff = export_vs_supernet_diff(str(tiny_run), 0.5)
    assert windows >= 200 and diff < 1e-4


def test_reloaded_teacher_reproduces_its_recorded_dev_scores(tiny_run):
    """The exported static teacher, decoded as predict.py decodes, scores dev exactly as training did."""
    from ner_compress.deploy.backends import StaticTagger
    from ner_compress.core.config import Config
    from ner_compress.models.model_data import prepare_data
    from ner_compress.compress.training import evaluate

    manifest = json.load(open(trained_dir(tiny_run) / "manifest.json"))
    data = prepare_data(Config(**manifest["config"]))
    tagger = StaticTagger(str(exported_dir(tiny_run)))
    scores = evaluate(tagger.logits, data, tagger.windows(data.splits.dev), 64)
    recorded = manifest["metrics"]["dev"]
    # the dev loss is a continuous fingerprint of every log-probability (F1 of a tiny model is often 0)
    assert recorded["loss"] > 0.01 and scores["loss"] == pytest.approx(recorded["loss"], rel=1e-5)
    for key in ("precision", "recall", "f1", "predicted"):
        assert scores[key] == recorded[key], key


def test_exported_dynamic_model_reloads_at_half_width(tiny_run):
    import ner_compress  # noqa: F401
    from ner_compress.models.families import PrunedBertForTokenClassification

    model = PrunedBertForTokenClassification.from_pretrained(str(exported_dir(tiny_run, "dynamic", width=0.5)))
    layer = model.bert.encoder.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.weight.shape == [64, 64]


def rigged_static_model(directory, vocab_file, favourite):
    """A static model whose logits ignore the text and always favour the label ``favourite``."""
    import paddle
    from paddlenlp.transformers import BertConfig

    from ner_compress.deploy import export
    from ner_compress.deploy.backends import export_onnx, onnx_path_for
    from ner_compress.models.families import PrunedBertForTokenClassification

    model = PrunedBertForTokenClassification(BertConfig(
        vocab_size=21128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=len(TINY_LABELS)))
    model.classifier.weight.set_value(paddle.zeros_like(model.classifier.weight))
    bias = [0.0] * len(TINY_LABELS)
    bias[TINY_LABELS.index(favourite)] = 10.0
    model.classifier.bias.set_value(paddle.to_tensor(bias, dtype="float32"))
    model.eval()
    static_dir = os.path.join(directory, "static")
    export.save_static(model, static_dir, TINY_LABELS, 16, vocab_file)
    os.makedirs(os.path.dirname(onnx_path_for(static_dir)))
    export_onnx(static_dir, onnx_path_for(static_dir))
    return static_dir


@pytest.mark.parametrize("decoding,backend", [("viterbi", "onnxruntime"), ("argmax", "onnxruntime"),
                                              ("viterbi", "paddle")])
def test_predict_spans_equal_known_entities(tmp_path, vocab_file, decoding, backend):
    """Every character tagged B-PER: each one is its own PER entity, across window edges too
    (max length 16 against a 40-character text)."""
    model_dir = rigged_static_model(tmp_path / "b_per", vocab_file, "B-PER")
    texts = ["中国人民银行在北京开会", "北京" * 20]
    result = tool("predict.py", "--model_dir", model_dir, "--decoding", decoding, "--backend", backend,
                  "--text", texts[0], "--text", texts[1])
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["text"] for r in records] == texts
    for record, text in zip(records, texts):
        expected = [{"type": "PER", "start": i, "end": i + 1, "text": c} for i, c in enumerate(text)]
        assert record["entities"] == expected


def test_viterbi_repairs_a_model_that_only_says_inside(tmp_path, vocab_file):
    """Always I-LOC: argmax yields I- tags that start no entity; Viterbi must start with B-LOC and
    continue, so the whole text is one LOC entity."""
    model_dir = rigged_static_model(tmp_path / "i_loc", vocab_file, "I-LOC")
    text = "上海" * 15  # 30 characters, three windows
    result = tool("predict.py", "--model_dir", model_dir, "--text", text)
    assert json.loads(result.stdout)["entities"] == [{"type": "LOC", "start": 0, "end": 30, "text": text}]


def test_untrained_width_is_refused_and_export_kept(tiny_run):
    before = file_stats(tiny_run)
    result = tool("export.py", "--width_mult", 0.75, "--output_dir", tiny_run, check=False)
    assert result.returncode == 2
    assert "--width_mult 0.75: not trained" in last_line(result.stderr)
    assert file_stats(tiny_run) == before  # the exports there, and everything else


def test_missing_teacher_names_the_command(tmp_path):
    result = tool("ofa_compress.py", "--output_dir", tmp_path, check=False)
    assert result.returncode == 2
    assert "tools/train_teacher.py" in last_line(result.stderr)


def test_bad_training_file_fails_with_file_and_line(tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text("中\tB-PER\n国\tI-PER\n人\n", encoding="utf-8")
    result = tool("train_teacher.py", "--config", TINY, "--train_file", bad, "--output_dir", tmp_path / "out",
                  check=False)
    assert result.returncode == 2
    assert f"{bad}:3:" in last_line(result.stderr)
    assert not trained_dir(tmp_path / "out").exists()


def test_teacher_from_local_pretrained_directory(tiny_run, tmp_path):
    """--model_name_or_path with a directory: with a zero learning rate the new teacher is exactly
    the one the fixture saved (not a fresh random model)."""
    from safetensors.numpy import load_file

    tool("train_teacher.py", "--config", TINY, "--max_steps", 1, "--eval_steps", 1, "--learning_rate", 0,
         "--model_name_or_path", trained_dir(tiny_run), "--output_dir", tmp_path)
    manifest = json.load(open(trained_dir(tmp_path) / "manifest.json"))
    assert manifest["config"]["model_name_or_path"] == str(trained_dir(tiny_run))
    start = json.load(open(trained_dir(tiny_run) / "manifest.json"))
    assert manifest["inputs"]["model"]["weights_sha256"] == start["weights_sha256"]  # what it started from
    assert manifest["inputs"]["model"]["stage"] == "teacher" and "hidden_size" not in manifest["config"]
    source = load_file(str(trained_dir(tiny_run) / "model.safetensors"))
    loaded = load_file(str(trained_dir(tmp_path) / "model.safetensors"))
    assert sorted(source) == sorted(loaded)
    assert all((source[k] == loaded[k]).all() for k in source)


@pytest.mark.slow
def test_reference_width_list_on_a_12_head_model(tmp_path):
    """1.0 0.8333 0.6667 0.5 on 12 heads: whole heads 12/10/8/6, exports that predict as the supernet."""
    tool("train_teacher.py", "--config", TINY, "--hidden_size", 96, "--num_attention_heads", 12,
         "--intermediate_size", 192, "--max_steps", 6, "--eval_steps", 6, "--output_dir", tmp_path)
    tool("ofa_compress.py", "--width_mult_list", 1.0, 0.8333, 0.6667, 0.5, "--ofa_max_steps", 4,
         "--ofa_eval_steps", 4, "--output_dir", tmp_path)
    for width, heads in ((0.8333, 10), (0.6667, 8)):
        tool("export.py", "--width_mult", width, "--output_dir", tmp_path)
        manifest = json.load(open(exported_dir(tmp_path, width=width) / "manifest.json"))
        ofa = manifest["inputs"]["ofa"]
        assert ofa["heads"] == heads and ofa["effective_width_mult"] == pytest.approx(heads / 12)
        assert ofa["ffn_neurons"] == 192 * heads // 12
        windows, diff = export_vs_supernet_diff(str(tmp_path), width, 100)
        assert diff < 1e-4
