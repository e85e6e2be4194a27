"""Shared fixtures. ``ner_compress`` is imported before paddle: its compat module works around
a zlib clash that otherwise breaks importing paddlenlp after paddle. Nothing here imports paddle at
the top: the serving tests (tests/serving_tests.txt) run in the deploy install, which has none."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ner_compress  # noqa: E402,F401  (before paddle)

import pytest  # noqa: E402

from ner_compress.core import resources  # noqa: E402

TINY_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
NO_DROPOUT = ["--hidden_dropout_prob", 0, "--attention_probs_dropout_prob", 0]
# 1 layer x 32 hidden, 2 heads under the tiny 2 x 64, 4-head teacher: projections, head-averaged attention
STUDENT_MATCHES = json.dumps([
    {"student_layer": 0, "teacher_layer": 0, "feature": "hidden", "weight": 0.1},
    {"student_layer": 1, "teacher_layer": 2, "feature": "hidden", "loss": "cosine"},
    {"student_layer": 1, "teacher_layer": 2, "feature": "attention", "loss": "mse"},
    {"student_layer": 1, "teacher_layer": 1, "feature": "attention", "loss": "cosine"},
])


@pytest.fixture
def write_file(tmp_path):
    """``write_file(name, content)``: write text (as UTF-8, newlines untouched) or bytes; return the path."""
    def _write(name, content):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)
    return _write


@pytest.fixture(scope="session")
def vocab_file():
    """bert-base-chinese vocabulary from the cache ($NER_COMPRESS_CACHE)."""
    return resources.vocab_path()


@pytest.fixture
def tiny_bert(vocab_file):
    """A small, randomly initialised ``BertForTokenClassification`` in eval mode (seeded)."""
    import paddle
    from paddlenlp.transformers import BertConfig, BertForTokenClassification

    paddle.seed(1234)
    config = BertConfig(vocab_size=21128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=len(TINY_LABELS))
    model = BertForTokenClassification(config)
    model.eval()
    return model


# a static export dir made by ``build_tiny_export`` in the full install: the deploy venv, which cannot
# export, runs the serving tests (tests/serving_tests.txt) on it
TEST_EXPORT_VARIABLE = "NER_COMPRESS_TEST_EXPORT"


def build_tiny_export(out):
    """The tiny config's teacher after two training steps, exported by the tools (static, ONNX, INT8); returns
    its static dir. Barely trained, it still tags entities under argmax decoding (a longer-trained tiny model
    predicts all "O"), so comparing two ways of predicting compares real entity lists."""
    run_tool("train_teacher.py", "--config", TINY, "--max_steps", 2, "--eval_steps", 2, "--output_dir", out)
    run_tool("export.py", "--teacher", "--output_dir", out)
    return os.path.join(str(out), "export", "teacher", "static")


@pytest.fixture(scope="session")
def served_export(tmp_path_factory):
    """The static dir of a tiny export: ``$NER_COMPRESS_TEST_EXPORT`` when set, else built here."""
    import pathlib

    given = os.environ.get(TEST_EXPORT_VARIABLE)
    if given:
        assert os.path.isfile(os.path.join(given, "inference.json")), \
            f"${TEST_EXPORT_VARIABLE} {given}: not a static export dir; make one with conftest.build_tiny_export"
        return pathlib.Path(given)
    return pathlib.Path(build_tiny_export(tmp_path_factory.mktemp("served")))


def random_bio_tags(rng, n, types=("PER", "LOC", "ORG")):
    """A valid BIO sequence (no I- without its B-) of length n."""
    tags, prev = [], "O"
    for _ in range(n):
        r = rng.rand()
        if prev != "O" and r < 0.4:
            tag = "I-" + prev[2:]
        elif r < 0.7:
            tag = "O"
        else:
            tag = "B-" + types[rng.randint(len(types))]
        tags.append(tag)
        prev = tag
    return tags


def export_vs_supernet_diff(output_dir, width, n_sentences=200):
    """Max log-prob difference between the exported static model at ``width`` and the trained
    supernet at that width, on test sentences (export's own parity check used 16 dev windows)."""
    from ner_compress.deploy import export
    from ner_compress.compress import supernet
    from ner_compress.deploy.backends import StaticTagger
    from ner_compress.data.window_scores import window_log_probs
    from ner_compress.models.model_data import prepare_data
    from ner_compress.core.config import Config

    static = StaticTagger(os.path.join(output_dir, "export", f"width_{width}", "static"))
    ofa_model, _ = export.load_supernet_width(os.path.join(output_dir, "ofa", f"width_{width}"))
    supernet.set_width(ofa_model, width)
    cfg = Config(max_seq_length=static.max_seq_length, test_limit=n_sentences)
    windows = static.windows(prepare_data(cfg).splits.test)
    a = window_log_probs(static.logits, windows, 32, static.encoder.pad_id)
    b = window_log_probs(supernet.ofa_logits(ofa_model), windows, 32, static.encoder.pad_id)
    return len(windows), max(float(abs(x - y).max()) for x, y in zip(a, b) if len(x))


def tool_command(name, *args, launcher=()):
    """``[python, *launcher, tools/<name>, *args]``; ``launcher``: e.g. ``-m paddle.distributed.launch ...``."""
    return [sys.executable, *map(str, launcher), os.path.join(ROOT, "tools", name), *map(str, args)]


def run_tool(name, *args, check=True, timeout=None, env=None, launcher=()):
    """``tools/<name>`` in a subprocess from the repository root; fails the test on a non-zero exit when
    ``check``. ``env``: the child's whole environment (default: this process's)."""
    import subprocess

    result = subprocess.run(tool_command(name, *args, launcher=launcher), capture_output=True, text=True,
                            cwd=ROOT, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def launch(nproc, tool, out, *args):
    """``tools/<tool> --output_dir out`` under ``paddle.distributed.launch`` on ``nproc`` CPU processes;
    returns each worker's log text by file name."""
    log_dir = out / f"log-{tool}"
    result = run_tool(tool, "--output_dir", out, *args, check=False, timeout=600, launcher=[
        "-m", "paddle.distributed.launch", "--nproc_per_node", nproc, "--log_dir", log_dir])
    logs = {p: (log_dir / p).read_text() for p in os.listdir(log_dir) if p.startswith("workerlog")}
    assert result.returncode == 0, result.stdout[-2000:] + "\n".join(v[-2000:] for v in logs.values())
    return logs


def wait_for(path, proc, timeout=120):
    """Poll until ``path`` exists; fail if ``proc`` ends first or ``timeout`` seconds pass."""
    import time

    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, "the run ended before the checkpoint appeared"
        assert time.time() - start < timeout
        time.sleep(0.02)


def max_weight_diff(a, b):
    """Largest absolute difference between two weight dicts with the same keys."""
    import numpy as np

    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def train_near_random_teacher(out):
    """A tiny teacher trained 2 steps at a negligible rate: near-random weights tag many (wrong)
    entities, so comparing two backends' predictions is not 0 == 0."""
    run_tool("train_teacher.py", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--output_dir", out,
             "--max_steps", 2, "--eval_steps", 1, "--learning_rate", 1e-7)
