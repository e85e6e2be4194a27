"""Shared fixtures. ``ner_compress`` is imported before paddle: its compat module works around
a zlib clash that otherwise breaks importing paddlenlp after paddle. Nothing here imports paddle at
the top: the serving tests (tests/serving_tests.txt) run in the deploy install, which has none."""
import json
import os
import pathlib
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ner_compress  # noqa: E402,F401  (before paddle)

import pytest  # noqa: E402

from ner_compress.core import layout, resources  # noqa: E402

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


def trained_dir(out, source="teacher", width=None):
    """Where the stages put a trained model under ``out`` (``core/layout``), as a ``pathlib.Path``."""
    return pathlib.Path(layout.trained_dir(str(out), layout.ModelRef(source, width))[0])


def exported_dir(out, sub="static", source="teacher", width=None):
    """``sub`` (static, dynamic or onnx) of a model's export under ``out`` (``core/layout``)."""
    return pathlib.Path(layout.export_dir(str(out), layout.ModelRef(source, width)), sub)


def checkpoints_dir(out, stage="teacher"):
    """A stage's resumable checkpoints under ``out`` (``core/layout``)."""
    return pathlib.Path(layout.checkpoint_dir(str(out), stage))


def build_tiny_export(out):
    """The tiny config's teacher after two training steps at a negligible rate, exported by the tools (static,
    ONNX, INT8); returns its static dir. Near-random weights tag many (wrong) entities even under argmax decoding
    (a longer-trained tiny model predicts all "O"), so comparing two ways of predicting compares real entity
    lists. The first stages of the shared ``tiny_run``; CI's deploy install serves it (.ci/serving-tests)."""
    train_near_random_teacher(out)
    run_tool("export.py", "--teacher", "--output_dir", out)
    return exported_dir(out)


# --- the shared tiny run: built once a session, read by many modules, written by none ------------------

def file_stats(root):
    """Every file under ``root``: relative path -> (size, mtime_ns)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return found


def file_hashes(root):
    """Every file under ``root``: relative path -> sha256."""
    import hashlib

    return {rel: hashlib.sha256(open(os.path.join(root, rel), "rb").read()).hexdigest() for rel in file_stats(root)}


def changed_files(before, after):
    """Paths added, removed or altered between two ``file_stats`` or ``file_hashes`` of one tree."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


_SHARED_RUN_STATS = {}  # the tiny run's directory -> its file_stats when it was finished


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """ONE tiny run for the session, for tests that only read it: the near-random teacher of
    ``build_tiny_export`` with its export, a width supernet (1.0 and 0.5: two steps at a negligible rate, so
    width 0.5 still tags many entities) and width 0.5's export. A test that writes copies what it changes into
    its own directory first (``copy_stages``): after every test the run's files must be as they were (size and
    mtime; the failure names the test), and at the session's end their sha256 too. Root ignores file modes, so
    these checks, not a read-only tree, are the guard. Tests using it are marked slow
    (``pytest_collection_modifyitems``)."""
    out = tmp_path_factory.mktemp("tiny_run")
    build_tiny_export(out)
    # no --config: the OFA stage inherits the teacher's recorded config
    run_tool("ofa_compress.py", "--output_dir", out, "--width_mult_list", 1.0, 0.5, "--ofa_max_steps", 2,
             "--ofa_eval_steps", 1, "--ofa_learning_rate", 1e-7)
    run_tool("export.py", "--width_mult", 0.5, "--output_dir", out)
    hashes = file_hashes(out)
    _SHARED_RUN_STATS[str(out)] = file_stats(out)
    yield out
    assert not changed_files(hashes, file_hashes(out)), \
        f"the shared tiny run {out} was changed during the session: {changed_files(hashes, file_hashes(out))}"


@pytest.fixture(autouse=True)
def _shared_run_untouched():
    """Fails the test (at its teardown) that changed a file of the shared ``tiny_run``, whichever path it took;
    the next test is compared with the changed files (the session's end, with the files as built)."""
    yield
    for out, stats in _SHARED_RUN_STATS.items():
        _SHARED_RUN_STATS[out] = file_stats(out)
        changed = changed_files(stats, _SHARED_RUN_STATS[out])
        assert not changed, f"this test changed the shared tiny run {out} (copy what you change with copy_stages): " \
                            f"{changed}"


def copy_stages(run, destination, *, supernet=False):
    """The trained teacher of ``run`` (and, with ``supernet``, its width supernet) copied under
    ``destination``: an output dir of the test's own, to write in."""
    sources = [layout.stage_dir(str(run), "teacher")] + ([layout.ofa_dir(str(run))] if supernet else [])
    for source in sources:
        shutil.copytree(source, os.path.join(destination, os.path.relpath(source, run)))
    return destination


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or exports a model through the tools, or reads the shared "
                                       "tiny run (pytest -m 'not slow' for a quick loop)")


def pytest_collection_modifyitems(items):
    for item in items:  # served_export asks for the tiny run only when it is built here, so it is named too
        if {"tiny_run", "served_export"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def served_export(request):
    """The static dir of a tiny export: ``$NER_COMPRESS_TEST_EXPORT`` when set, else the shared run's teacher."""
    given = os.environ.get(TEST_EXPORT_VARIABLE)
    if given:
        assert os.path.isfile(os.path.join(given, "inference.json")), \
            f"${TEST_EXPORT_VARIABLE} {given}: not a static export dir; make one with conftest.build_tiny_export"
        return pathlib.Path(given)
    return exported_dir(request.getfixturevalue("tiny_run"))


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

    static = StaticTagger(str(exported_dir(output_dir, width=width)))
    ofa_model, _ = export.load_supernet_width(str(trained_dir(output_dir, width=width)))
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
    run_tool("train_teacher.py", "--config", TINY, "--output_dir", out, "--max_steps", 2, "--eval_steps", 1,
             "--learning_rate", 1e-7)
