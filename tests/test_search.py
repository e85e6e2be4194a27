"""tools/search.py on a tiny run: a per-layer plan within the budget, written and exported like any model; each
refusal one line with nothing written."""
import json
import os
import re
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
                      "--name", "again", "--skip_export", "--verbose")
    assert "latency table cached, scaled" in result.stderr
    assert re.search(r"Fisher importance .* \(cached\)", result.stderr)
    manifest = json.load(open(os.path.join(searched, "search", "again", MANIFEST)))
    first = json.load(open(os.path.join(searched, "search", "fast", MANIFEST)))
    assert manifest["search"]["latency_table"]["scaled"] > 0 and first["search"]["latency_table"]["scaled"] == 1
    assert manifest["search"]["teacher_ms"] == pytest.approx(
        first["search"]["teacher_ms"] * manifest["search"]["latency_table"]["scaled"], rel=1e-3)
    assert "training" not in manifest["search"]  # by default the refit is the model


@pytest.mark.parametrize("flags, message", [
    (["--speedup", "0.5"], "the teacher itself meets it"),
    (["--latency_ms", "1e-6"], "no sub-network meets it"),
    (["--speedup", "2", "--latency_ms", "1"], "exactly one of --latency_ms or --speedup"),
    (["--speedup", "2", "--backend", "paddle", "--precision", "int8"], "--backend paddle --precision int8"),
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


def test_a_paddle_inference_budget_is_searched_on_its_own_table(exported_teacher, monkeypatch):
    """Every stack and the chosen export run in Paddle Inference; the figure returned is their parameter bytes,
    as the tiny model's real times are all call overhead; its embeddings are most of its bytes (--speedup 1.02)."""
    from ner_compress.commands.search import search_cli
    from ner_compress.core.static_files import static_model_files
    from ner_compress.measure import paddle_latency

    timed = []

    def static_ms(static_dir, feeds, workload, threads, repeats=3):
        assert real_static_ms(static_dir, feeds, workload, threads, repeats=1) > 0
        timed.append(static_dir)
        return os.path.getsize(static_model_files(static_dir)[1]) / 1e4

    real_static_ms = paddle_latency.static_ms
    monkeypatch.setattr(paddle_latency, "static_ms", static_ms)
    search_cli(["--output_dir", str(exported_teacher), "--backend", "paddle", "--speedup", "1.02",
                "--workload_sentences", "8", "--name", "on_paddle", "--search_max_steps", "0"])
    record = json.load(open(os.path.join(exported_teacher, "search", "on_paddle", MANIFEST)))["search"]
    assert record["backend"] == "paddle" and record["predicted_ms"] <= record["budget_ms"] < record["teacher_ms"]
    assert record["latency_table"]["backend"] == "paddle" and "paddle" in record["latency_table"]
    assert record["measured_ms"] == pytest.approx(record["predicted_ms"], rel=0.05)  # parameters are additive
    assert timed[-1].endswith(os.path.join("search_on_paddle", "static")) and len(timed) > 10


def test_a_refused_int8_copy_leaves_an_fp32_search_timed(exported_teacher, monkeypatch):
    """The export's INT8 refusal (its F1 margin missed) is a warning for an FP32 budget: the FP32 graph is timed."""
    from ner_compress.commands import stages
    from ner_compress.commands.search import search_cli
    from ner_compress.core.errors import Int8Refused

    def export_then_refuse_int8(cfg, ref, data=None):
        real_export(cfg, ref, data)
        raise Int8Refused("--int8_max_f1_drop 0.5: dynamic INT8 drops dev F1 by 0.51 points")

    real_export = stages.run_export
    monkeypatch.setattr(stages, "run_export", export_then_refuse_int8)
    warnings = []  # captured here: the console handler's stream may belong to an earlier test
    monkeypatch.setattr(stages.log, "warning", lambda fmt, *args: warnings.append(fmt % args))
    search_cli(["--output_dir", str(exported_teacher), "--speedup", "1.05", "--workload_sentences", "8",
                "--name", "no_int8", "--search_max_steps", "0"])
    record = json.load(open(os.path.join(exported_teacher, "search", "no_int8", MANIFEST)))["search"]
    assert record["measured_ms"] > 0
    assert warnings == ["INT8 not kept: --int8_max_f1_drop 0.5: dynamic INT8 drops dev F1 by 0.51 points"]


def test_paddle_part_costs_add_up_to_the_stacks_they_were_taken_from():
    """Whatever share of a whole layer goes to each part, predictions equal an additive stack's cost."""
    from ner_compress.measure import latency_table as lt
    from ner_compress.measure.paddle_latency import StackTimer

    def stack_ms(layers, heads, neurons):  # 0.7 ms outside the layers, parts linear in their width
        return 0.7 + layers * (0.05 + 0.02 * heads + 0.001 * neurons)

    timer = StackTimer(stack_ms, 4, 32)
    shape = lt.LayerShape(16, 4, 4, 32)
    teacher_ms = stack_ms(3, 4, 32)
    table = lt.measure_table(shape, {}, timer.part_ms, lambda t: teacher_ms - t.predict([4] * 3, [32] * 3))
    plan = ([1, 4, 2], [8, 32, 16])
    assert table.predict(*plan) == pytest.approx(0.7 + sum(0.05 + 0.02 * h + 0.001 * n for h, n in zip(*plan)))
