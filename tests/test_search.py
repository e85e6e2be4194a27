"""tools/search.py on a tiny run: a per-layer plan within the budget, written and exported like any model; each
refusal one line with nothing written."""
import json
import os
import shutil

import onnx
import pytest

from conftest import copy_stages, run_tool
from ner_compress.core import layout
from ner_compress.core.artifacts import MANIFEST


@pytest.fixture(scope="module")
def exported_teacher(tiny_run, tmp_path_factory):
    """The shared run's teacher and its export, copied: the search writes search/ beside them."""
    out = tmp_path_factory.mktemp("search")
    copy_stages(tiny_run, str(out))
    teacher_export = layout.export_dir(str(tiny_run), layout.ModelRef("teacher"))
    shutil.copytree(teacher_export, os.path.join(out, os.path.relpath(teacher_export, tiny_run)))
    return out


@pytest.fixture(scope="module")
def searched(exported_teacher):
    out = exported_teacher
    run_tool("search.py", "--output_dir", out, "--speedup", "1.05", "--workload_sentences", "16", "--name", "fast",
             "--search_max_steps", "4", "--search_eval_steps", "2")
    return out


def test_the_searched_model_is_within_budget_and_exported(searched):
    ref = layout.ModelRef("search", label="fast")
    model_dir, _ = layout.trained_dir(str(searched), ref)
    manifest = json.load(open(os.path.join(model_dir, MANIFEST)))
    record = manifest["search"]
    assert record["predicted_ms"] <= record["budget_ms"] < record["teacher_ms"]
    assert record["measured_ms"] > 0 and record["candidates"]
    assert all(c["predicted_ms"] <= record["budget_ms"] for c in record["candidates"])
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["layer_heads"] == manifest["layer_heads"] and len(config["layer_heads"]) == 2
    graph = onnx.load(os.path.join(layout.export_dir(str(searched), ref), "onnx", "model.opt.onnx"))
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in graph.graph.node
             if n.op_type == "Attention"]
    assert heads == config["layer_heads"]  # one fused Attention per layer, each with its own heads
    assert ref in layout.exported_models(str(searched))


def test_the_chosen_model_is_trained_and_keeps_its_best_step(searched):
    model_dir, _ = layout.trained_dir(str(searched), layout.ModelRef("search", label="fast"))
    manifest = json.load(open(os.path.join(model_dir, MANIFEST)))
    training = manifest["search"]["training"]
    assert training["steps"] == 4 and training["kept_step"] in (0, 2, 4)
    assert training["dev_f1"] >= training["dev_f1_before"]  # step 0 (the refit) is kept unless training beats it
    assert manifest["metrics"]["dev_f1"] == training["dev_f1"]
    assert os.path.isdir(layout.checkpoint_dir(str(searched), "search_fast"))


def test_the_latency_table_is_reused(searched):
    result = run_tool("search.py", "--output_dir", searched, "--speedup", "1.05", "--workload_sentences", "16",
                      "--name", "again", "--skip_export", "--search_max_steps", "0")
    assert "latency table cached" in result.stderr
    manifest = json.load(open(os.path.join(searched, "search", "again", MANIFEST)))
    assert "training" not in manifest["search"]  # 0 steps: the refit is the model


@pytest.mark.parametrize("flags, message", [
    (["--speedup", "0.5"], "the teacher itself meets it"),
    (["--latency_ms", "1e-6"], "no sub-network meets it"),
    (["--speedup", "2", "--latency_ms", "1"], "exactly one of --latency_ms or --speedup"),
    (["--speedup", "2", "--backend", "paddle"], "--backend paddle"),
    (["--speedup", "2", "--search_eval_steps", "0"], "--search_eval_steps 0"),
])
def test_refusals_are_one_line_and_write_nothing(exported_teacher, flags, message):
    before = sorted(os.listdir(os.path.join(exported_teacher, "search"))) if os.path.isdir(
        os.path.join(exported_teacher, "search")) else []
    result = run_tool("search.py", "--output_dir", exported_teacher, "--workload_sentences", "8", "--name", "refused",
                      *flags, check=False)
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and message in error[0], result.stderr[-2000:]
    after = sorted(os.listdir(os.path.join(exported_teacher, "search"))) if os.path.isdir(
        os.path.join(exported_teacher, "search")) else []
    assert "refused" not in after and set(after) - set(before) <= {"latency"}


def test_a_run_without_an_exported_teacher_is_refused(tiny_run, tmp_path):
    copy_stages(tiny_run, str(tmp_path))
    result = run_tool("search.py", "--output_dir", tmp_path, "--speedup", "2", check=False)
    assert result.returncode != 0 and "tools/export.py --teacher" in result.stderr
