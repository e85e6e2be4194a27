"""ONNX Runtime beside Paddle Inference: export parity, same entities, bucketed padding, --backend refusals."""
import json
import pathlib
import shutil

import numpy as np
import pytest
from conftest import TINY, exported_dir
from conftest import run_tool as tool

from ner_compress.core import layout


@pytest.fixture(scope="module")
def export_dir(tiny_run):
    """The shared run's teacher export (near-random: it tags many entities)."""
    return pathlib.Path(layout.export_dir(str(tiny_run), layout.ModelRef("teacher")))


@pytest.fixture(scope="module")
def varied_texts():
    """A few hundred real sentences of varied lengths, plus long texts cut into several windows."""
    import ner_compress  # noqa: F401
    from ner_compress.core.config import Config, load_yaml
    from ner_compress.data.corpus import load_splits

    splits = load_splits(Config(**load_yaml(TINY)))
    texts = ["".join(s.chars) for s in splits.test + splits.dev]
    long_texts = ["".join(texts[i: i + 6]) for i in range(0, 60, 6)]  # max_seq_length is 64
    assert min(len(t) for t in long_texts) > 2 * 64
    return texts + long_texts


def test_export_records_onnx_parity_and_hashes_the_file(export_dir):
    for sub in ("static", "onnx"):
        manifest = json.load(open(export_dir / sub / "manifest.json"))
        diffs = manifest["metrics"]["parity_max_abs_diff"]
        assert set(diffs) == {"reloaded dynamic model", "static predictor", "onnx runtime"}
        assert all(d < 1e-4 for d in diffs.values())
    assert "model.onnx" in json.load(open(export_dir / "onnx" / "manifest.json"))["weights_sha256"]


def test_onnx_runtime_and_paddle_tag_the_same_entities(export_dir, varied_texts):
    from ner_compress.deploy.backends import load_tagger

    static = str(export_dir / "static")
    for batch_size in (1, 32):
        paddle = load_tagger(static, "paddle", batch_size=batch_size).predict(varied_texts)
        ort = load_tagger(static, "onnxruntime", batch_size=batch_size).predict(varied_texts)
        assert sum(len(r["entities"]) for r in paddle) > 100
        assert ort == paddle


@pytest.mark.parametrize("backend", ["paddle", "onnxruntime"])
def test_bucketed_padding_keeps_logits_on_real_positions(export_dir, varied_texts, backend):
    from ner_compress.deploy.backends import load_tagger
    from ner_compress.data.corpus import Sentence
    from ner_compress.data.window_scores import bucket_length, model_inputs

    tagger = load_tagger(str(export_dir / "static"), backend)
    pad = tagger.encoder.pad_id
    windows = tagger.windows([Sentence(list(t), []) for t in varied_texts[:40]])
    lengths = sorted({len(w.input_ids) for w in windows})
    assert len(lengths) > 10 and any(bucket_length(n) != n for n in lengths)
    for window in windows[:40]:
        plain = model_inputs([window], pad, 0)
        padded = model_inputs([window], pad)
        n = len(window.input_ids)
        assert padded["input_ids"].shape[1] == bucket_length(n) and (padded["input_ids"][0, n:] == pad).all()
        unpadded = tagger.logits(plain["input_ids"], plain["token_type_ids"])[0]
        bucketed = tagger.logits(padded["input_ids"], padded["token_type_ids"])[0, :n]
        np.testing.assert_allclose(bucketed, unpadded, atol=1e-5)
    # the comparison can fail: padding with a real character instead of [PAD] is not masked
    window = next(w for w in windows if bucket_length(len(w.input_ids)) > len(w.input_ids))
    plain = model_inputs([window], pad, 0)
    unmasked = model_inputs([window], tagger.encoder.cls_id)
    n = len(window.input_ids)
    assert np.abs(tagger.logits(unmasked["input_ids"], unmasked["token_type_ids"])[0, :n]
                  - tagger.logits(plain["input_ids"], plain["token_type_ids"])[0]).max() > 1e-3


def test_bucket_lengths():
    from ner_compress.data.window_scores import bucket_length

    assert [bucket_length(n) for n in (1, 16, 17, 48, 120, 128)] == [16, 16, 32, 48, 128, 128]
    assert bucket_length(17, 0) == 17


def test_unknown_backend_is_refused_in_one_line(export_dir):
    result = tool("predict.py", "--model_dir", export_dir / "static", "--text", "北京", "--backend", "tensorrt",
                  check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --backend tensorrt: unknown; use one of paddle, onnxruntime"


def test_missing_onnx_file_is_refused_with_the_command_that_writes_it(export_dir, tmp_path):
    static = exported_dir(tmp_path)
    shutil.copytree(export_dir / "static", static)
    result = tool("predict.py", "--model_dir", static, "--text", "北京", "--backend", "onnxruntime", check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --backend onnxruntime: no ") and "python tools/export.py" in last
    # the default backend needs the file too; Paddle Inference does not
    assert tool("predict.py", "--model_dir", static, "--text", "北京", check=False).returncode == 2
    assert tool("predict.py", "--model_dir", static, "--text", "北京", "--backend", "paddle").returncode == 0


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp16"], "error: --precision fp16: Paddle Inference on GPU only; use --backend paddle --device gpu"),
    (["--backend", "paddle", "--tensorrt"],
     "error: --tensorrt: Paddle Inference on GPU only; use --backend paddle --device gpu"),
    (["--device", "gpu", "--backend", "onnxruntime"],
     "error: --backend onnxruntime: CPU only here; use --backend paddle with --device gpu"),
    (["--device", "gpu", "--precision", "int8"],  # the GPU default backend is Paddle Inference
     "error: --precision int8: ONNX Runtime's export only; use --backend onnxruntime (Paddle Inference INT8 is "
     "measured by tools/benchmark.py)"),
])
def test_engine_choices_that_do_not_go_together_are_refused_in_one_line(export_dir, flags, message):
    result = tool("predict.py", "--model_dir", export_dir / "static", "--text", "北京", *flags, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == message


def test_a_gpu_predictor_on_a_cpu_build_is_refused_in_one_line(export_dir):
    import paddle

    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this paddlepaddle has CUDA")
    result = tool("predict.py", "--model_dir", export_dir / "static", "--text", "北京", "--device", "gpu",
                  "--precision", "fp16", "--tensorrt", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device gpu: this paddlepaddle has no CUDA")


def test_tensorrt_shape_ranges_cover_every_bucketed_batch():
    from ner_compress.deploy.backends import INPUT_NAMES, tensorrt_shapes

    low, high, best = tensorrt_shapes(max_batch_size=32, max_seq_length=120)
    for name in INPUT_NAMES:
        assert low[name] == [1, 16] and high[name] == [32, 128]  # 120 characters pad up to the 128 bucket
        assert low[name] <= best[name] <= high[name]
    assert tensorrt_shapes(4, 8)[1]["input_ids"] == [4, 16]  # never below one bucket
