"""The static graph's files on either Paddle: what export writes, what each consumer reads or refuses."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import ROOT, TINY_LABELS

from ner_compress.core import artifacts, static_files
from ner_compress.deploy import backends, export
from ner_compress.measure import benchmark
from ner_compress.core.errors import UserError

PADDLE_3 = paddle.__version__.split(".")[0] == "3"
IDS = np.array([[101, 2476, 676, 1762, 1266, 102], [101, 776, 102, 0, 0, 0]], dtype="int64")


@pytest.fixture
def static_dir(tmp_path, tiny_bert, vocab_file):
    out = str(tmp_path / "static")
    export.save_static(tiny_bert, out, TINY_LABELS, 16, vocab_file)
    return out


def reference_logits(model):
    with paddle.no_grad():
        return model(input_ids=paddle.to_tensor(IDS), token_type_ids=paddle.zeros([2, 6], dtype="int64")).numpy()


def test_export_writes_the_running_paddles_format_and_every_consumer_reads_it(static_dir, tiny_bert, tmp_path):
    expected = static_files.PIR_PROGRAM if PADDLE_3 else static_files.LEGACY_PROGRAM
    program, params = static_files.static_model_files(static_dir)
    assert os.path.basename(program) == expected and os.path.basename(params) == "model.pdiparams"
    assert sorted(n for n in os.listdir(static_dir) if n in static_files.PROGRAM_FILES) == [expected]
    hashed = artifacts.weight_hashes(static_dir)
    assert {expected, "model.pdiparams"} <= set(hashed) and "inference.json" not in hashed
    assert benchmark.disk_bytes(static_dir) == os.path.getsize(program) + os.path.getsize(params)
    assert (benchmark.int8_unavailable(static_dir) is None) == (not PADDLE_3)  # INT8 reads only .pdmodel
    reference = reference_logits(tiny_bert)
    paddle_logits = backends.StaticTagger(static_dir, threads=1).logits(IDS, np.zeros_like(IDS))
    onnx_path = backends.export_onnx(static_dir, str(tmp_path / "model.onnx"))
    onnx_logits = backends.OnnxTagger(static_dir, onnx_path, threads=1).logits(IDS, np.zeros_like(IDS))
    np.testing.assert_allclose(paddle_logits, reference, atol=1e-4)
    np.testing.assert_allclose(onnx_logits, reference, atol=1e-4)


def test_missing_program_is_refused_naming_the_directory(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}: not an exported static model .*tools/export.py"):
        static_files.static_model_files(str(tmp_path))


def test_paddle2_refuses_a_pir_program_in_one_line_but_onnx_runtime_still_serves_it(tmp_path, monkeypatch):
    for name in ("static/inference.json", "static/model.json", "static/model.pdiparams", "onnx/model.onnx"):
        (tmp_path / "export" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "export" / name).write_text("{}")
    static = str(tmp_path / "export" / "static")
    monkeypatch.setattr(static_files, "PADDLE_VERSION", "2.6.2")
    with pytest.raises(UserError) as err:
        backends.check_backend("paddle", static)
    message = str(err.value)
    assert "\n" not in message and "made with Paddle 3.x" in message and "requirements.txt (Paddle 3)" in message
    backends.check_backend("onnxruntime", static)  # the ONNX file needs no Paddle: not refused
    monkeypatch.setattr(static_files, "PADDLE_VERSION", "3.3.1")
    backends.check_backend("paddle", static)


LEGACY_SAVE = """
import sys; sys.path.insert(0, {root!r})
import ner_compress, numpy as np, paddle
from paddle.static import InputSpec
paddle.seed(5)
class Tiny(paddle.nn.Layer):  # embedding and linear only: BERT's matmul does not trace with PIR off on 3.3.1
    def __init__(self):
        super().__init__()
        self.embed, self.classify = paddle.nn.Embedding(3000, 16), paddle.nn.Linear(16, 7)
    def forward(self, input_ids, token_type_ids):
        return self.classify(self.embed(input_ids) + self.embed(token_type_ids))
model = Tiny()
model.eval()
spec = [InputSpec([None, None], "int64", name=n) for n in ("input_ids", "token_type_ids")]
paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), {prefix!r})
ids = np.load({ids!r})
np.save({ref!r}, model(paddle.to_tensor(ids), paddle.zeros_like(paddle.to_tensor(ids))).numpy())
"""


@pytest.mark.skipif(not PADDLE_3, reason="Paddle 3 reading a Paddle 2 program; Paddle 2.6 writes only that one")
def test_paddle3_serves_a_legacy_program(tmp_path, write_file):
    """With PIR off before paddle loads, Paddle 3 writes the format Paddle 2.6 writes (model.pdmodel)."""
    legacy = tmp_path / "static"
    legacy.mkdir()
    write_file("static/inference.json", '{"labels": ["O"], "max_seq_length": 16}')
    np.save(tmp_path / "ids.npy", IDS)
    code = LEGACY_SAVE.format(root=ROOT, prefix=str(legacy / "model"), ids=str(tmp_path / "ids.npy"),
                              ref=str(tmp_path / "ref.npy"))
    script = write_file("legacy_save.py", code)  # dy2static reads the forward's source from a file
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FLAGS_enable_pir_api": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    program, _ = static_files.static_model_files(str(legacy))
    assert os.path.basename(program) == static_files.LEGACY_PROGRAM
    reference = np.load(tmp_path / "ref.npy")
    config = backends.predictor_config(str(legacy), threads=1)
    predictor = paddle.inference.create_predictor(config)
    for name, value in zip(predictor.get_input_names(), (IDS, np.zeros_like(IDS))):
        handle = predictor.get_input_handle(name)
        handle.reshape(value.shape)
        handle.copy_from_cpu(value)
    predictor.run()
    logits = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    np.testing.assert_allclose(logits, reference, atol=1e-5)
    onnx_path = backends.export_onnx(str(legacy), str(tmp_path / "legacy.onnx"))
    import onnxruntime

    onnx_logits = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": IDS, "token_type_ids": np.zeros_like(IDS)})[0]
    np.testing.assert_allclose(onnx_logits, reference, atol=1e-5)
