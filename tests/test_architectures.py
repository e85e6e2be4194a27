"""Every stage for each supported family: a tiny random model the test saves, then the whole chain."""
import json
import os
from functools import partial
import shutil

import numpy as np
import paddle
import pytest
from conftest import exported_dir, run_tool, trained_dir


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
MSRA_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
FAMILY_SHAPES = {"bert": {}, "ernie": {"use_task_id": True, "task_type_vocab_size": 3},
                 "roberta": {}, "electra": {"embedding_size": 16}}


tool = partial(run_tool, timeout=600)


def save_tiny(model_type, directory, vocab_file, **overrides):
    """A random model of ``model_type`` saved as safetensors with its vocabulary."""
    from ner_compress.models.families import FAMILIES

    config_class, model_class, _ = FAMILIES[model_type]
    paddle.seed(21)
    shape = dict(vocab_size=21128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=512, **FAMILY_SHAPES[model_type])
    shape.update(overrides)
    model = model_class(config_class(**shape))
    model.save_pretrained(str(directory), safe_serialization=True)
    shutil.copyfile(vocab_file, os.path.join(directory, "vocab.txt"))
    return directory


@pytest.fixture(scope="module", params=sorted(FAMILY_SHAPES))
def family_run(request, tmp_path_factory, vocab_file):
    model_type = request.param
    base = tmp_path_factory.mktemp(model_type)
    source = save_tiny(model_type, base / "pretrained", vocab_file)
    out = base / "out"
    tool("train_teacher.py", "--config", TINY, "--model_name_or_path", source, "--max_steps", 3, "--eval_steps", 3,
         "--output_dir", out)
    tool("ofa_compress.py", "--ofa_max_steps", 2, "--ofa_eval_steps", 2, "--output_dir", out)
    tool("reconstruct.py", "--width_mult", 0.5, "--calibration_sentences", 32, "--output_dir", out)
    tool("export.py", "--width_mult", 0.5, "--output_dir", out)
    return model_type, out


@pytest.mark.slow
def test_every_family_is_refit_layer_by_layer(family_run):
    _, out = family_run
    record = json.load(open(trained_dir(out, width=0.5) / "manifest.json"))["reconstruction"]
    assert [layer["layer"] for layer in record["layers"]] == [0, 1]
    assert all(layer[p]["fit_error_after"] <= layer[p]["fit_error_before"] + 1e-9
               for layer in record["layers"] for p in ("attention_output", "ffn_output"))


@pytest.mark.slow
def test_every_artifact_records_the_architecture(family_run):
    model_type, out = family_run
    for path in (trained_dir(out), trained_dir(out, width=0.5), exported_dir(out, width=0.5),
                 exported_dir(out, "dynamic", width=0.5)):
        assert json.load(open(path / "manifest.json"))["architecture"] == model_type, path


@pytest.mark.slow
def test_supernet_at_full_width_equals_the_teacher(family_run):
    from ner_compress.compress import supernet
    from ner_compress.models.families import model_class_for

    _, out = family_run
    teacher = model_class_for(str(trained_dir(out))).from_pretrained(str(trained_dir(out)))
    teacher.eval()
    ofa_model = supernet.WidthDistiller(teacher, 0.1, 1.0).ofa_model
    ofa_model.model.eval()
    ids = paddle.to_tensor(np.random.RandomState(0).randint(106, 8000, size=(3, 13)), dtype="int64")
    supernet.set_width(ofa_model, 1.0)
    with paddle.no_grad():
        ref = teacher(input_ids=ids, token_type_ids=paddle.zeros_like(ids))
        out_ = ofa_model(input_ids=ids, token_type_ids=paddle.zeros_like(ids), attention_mask=[None, None])
    assert float(ref.abs().max()) > 1e-3
    assert float((out_ - ref).abs().max()) < 1e-5


@pytest.mark.slow
def test_exported_half_width_reloads_and_predicts(family_run):
    from ner_compress.models.families import FAMILIES, model_class_for

    model_type, out = family_run
    dynamic = str(exported_dir(out, "dynamic", width=0.5))
    model = model_class_for(dynamic).from_pretrained(dynamic)
    assert type(model) is FAMILIES[model_type][1]
    layer = model.base_model.encoder.layers[0]
    assert layer.self_attn.num_heads == 2 and list(layer.linear1.weight.shape) == [32, 32]
    if model_type == "electra":  # the embedding projection is kept whole
        assert list(model.base_model.embeddings_project.weight.shape) == [16, 32]
    text = "中国人民银行在北京开会" * 8  # longer than max length 64: windows
    result = tool("predict.py", "--model_dir", exported_dir(out, width=0.5), "--text", text)
    record = json.loads(result.stdout)
    assert record["text"] == text and all(text[e["start"]:e["end"]] == e["text"] for e in record["entities"])


def test_unsupported_architecture_is_refused_with_the_flag(tmp_path, vocab_file):
    source = save_tiny("bert", tmp_path / "model", vocab_file)
    config = json.load(open(source / "config.json"))
    config["model_type"] = "gpt"
    json.dump(config, open(source / "config.json", "w"))
    result = tool("train_teacher.py", "--config", TINY, "--model_name_or_path", source, "--output_dir",
                  tmp_path / "out", check=False)
    assert result.returncode == 2
    assert f"--model_name_or_path {source}: architecture 'gpt' is not supported" in result.stderr.strip().splitlines()[-1]


def test_checkpoint_with_other_labels_is_refused_with_the_flag(tmp_path, vocab_file):
    labels = ["O", "B-X", "I-X"]
    source = save_tiny("ernie", tmp_path / "model", vocab_file, num_labels=3, id2label=dict(enumerate(labels)),
                       label2id={v: k for k, v in enumerate(labels)})
    result = tool("train_teacher.py", "--config", TINY, "--model_name_or_path", source, "--output_dir",
                  tmp_path / "out", check=False)
    assert result.returncode == 2
    assert f"--model_name_or_path {source}: its labels" in result.stderr.strip().splitlines()[-1]
    assert not trained_dir(tmp_path / "out").exists()


def test_a_model_directory_brings_its_own_vocabulary_one_id_per_character(tmp_path, vocab_file):
    """A vocabulary without 京 (ERNIE's and BERT's differ in such characters): every family maps
    each character to exactly one id, an unknown one to [UNK], so labels stay aligned."""
    from ner_compress.core.config import Config
    from ner_compress.data.vocab import CharEncoder, load_vocab
    from ner_compress.models.model_data import prepare_data

    lines = open(vocab_file, encoding="utf-8").read().split("\n")
    lines[lines.index("京")] = "[unused_jing]"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(lines), encoding="utf-8")
    data = prepare_data(Config(model_name_or_path=str(model_dir), test_limit=5, dev_limit=5, train_limit=5))
    assert data.vocab_file == str(model_dir / "vocab.txt")
    text = list("北京 A\u3000😀")
    own, bert = data.encoder.ids(text), CharEncoder(load_vocab(vocab_file)).ids(text)
    assert len(own) == len(bert) == len(text)
    assert own[1] == data.encoder.unk_id and bert[1] != CharEncoder(load_vocab(vocab_file)).unk_id
    assert own[3] == data.encoder.vocab["a"]  # Latin letters are looked up in lower case
