"""One padding id, the vocabulary's [PAD], in training, dev evaluation, export and prediction."""
import json
import os
from functools import partial

import pytest
from conftest import exported_dir, run_tool, trained_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
PAD_LINE = 100
pytestmark = pytest.mark.slow  # every test trains through the tools


tool = partial(run_tool, timeout=600)


@pytest.fixture(scope="module")
def moved_pad_run(tmp_path_factory, vocab_file):
    """A vocabulary whose [PAD] is line 100 (line 0 holds what line 100 held)."""
    out = tmp_path_factory.mktemp("moved_pad")
    lines = open(vocab_file, encoding="utf-8").read().split("\n")
    assert lines[0] == "[PAD]"
    lines[0], lines[PAD_LINE] = lines[PAD_LINE], lines[0]
    vocab = out / "vocab_pad_moved.txt"
    vocab.write_text("\n".join(lines), encoding="utf-8")
    # with the local convolution, which must also see only real characters
    tool("train_teacher.py", "--config", TINY, "--vocab_file", vocab, "--max_steps", 6, "--eval_steps", 6,
         "--local_conv_kernel", 3, "--output_dir", out)
    tool("export.py", "--teacher", "--output_dir", out)
    return out


def test_the_model_masks_the_vocabularys_pad(moved_pad_run):
    config = json.load(open(trained_dir(moved_pad_run) / "config.json"))
    assert config["pad_token_id"] == PAD_LINE
    assert config["local_conv_kernel"] == 3


def test_dev_evaluation_and_the_exported_predictor_agree(moved_pad_run):
    from ner_compress.deploy.backends import StaticTagger
    from ner_compress.core.config import Config
    from ner_compress.models.model_data import prepare_data
    from ner_compress.compress.training import evaluate

    manifest = json.load(open(trained_dir(moved_pad_run) / "manifest.json"))
    data = prepare_data(Config(**manifest["config"]))
    assert data.encoder.pad_id == PAD_LINE
    tagger = StaticTagger(str(exported_dir(moved_pad_run)))
    scores = evaluate(tagger.logits, data, tagger.windows(data.splits.dev), 64)
    assert scores["loss"] == pytest.approx(manifest["metrics"]["dev"]["loss"], rel=1e-5)


def test_padding_does_not_change_a_sentences_prediction(moved_pad_run):
    import numpy as np

    from ner_compress.deploy.backends import StaticTagger
    from ner_compress.data.corpus import Sentence, collate

    tagger = StaticTagger(str(exported_dir(moved_pad_run)))
    short, long = Sentence(list("我在北京"), []), Sentence(list("中国人民银行在上海召开会议" * 3), [])
    windows = tagger.windows([short, long])
    exact = np.array([windows[0].input_ids], dtype="int64")  # no padding at all
    alone = tagger.logits(exact, np.zeros_like(exact))
    batch = collate(windows, tagger.encoder.pad_id)
    assert (batch["input_ids"][0, len(windows[0].input_ids):] == PAD_LINE).all()
    together = tagger.logits(batch["input_ids"], batch["token_type_ids"])
    np.testing.assert_allclose(together[0, : alone.shape[1]], alone[0], atol=1e-5)
