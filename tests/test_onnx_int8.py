"""ONNX Runtime INT8 beside the FP32 export: recorded parity, same entities, refusal, precision choice."""
import json
import os

import onnx
import pytest
from conftest import copy_stages, exported_dir
from conftest import run_tool as tool

from ner_compress.core.errors import UserError


@pytest.fixture(scope="module")
def output_dir(tiny_run):
    """The shared run: its near-random teacher, exported; a test that exports again does so in a copy."""
    return tiny_run


def onnx_manifest(output_dir):
    return json.load(open(exported_dir(output_dir, "onnx") / "manifest.json"))


def op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_export_writes_a_dynamic_int8_copy_of_the_fused_graph_with_its_dev_parity(output_dir):
    onnx_dir = exported_dir(output_dir, "onnx")
    manifest = onnx_manifest(output_dir)
    int8 = manifest["onnx"]["int8"]
    assert int8["file"] == "model.int8.onnx" and int8["source"] == "model.opt.onnx" and int8["refused"] is None
    assert int8["f1_drop_points"] == pytest.approx(int8["dev_f1_fp32"] - int8["dev_f1_int8"])
    # the near-random teacher tags many entities, so agreement is not 0 == 0
    assert int8["fp32_entities"] > 500 and int8["entity_agreement_f1"] > 90
    assert "model.int8.onnx" in manifest["weights_sha256"]
    assert {"QAttention", "DynamicQuantizeMatMul"} & op_types(onnx_dir / "model.int8.onnx")
    assert os.path.getsize(onnx_dir / "model.int8.onnx") < os.path.getsize(onnx_dir / "model.opt.onnx")
    assert sorted(os.listdir(onnx_dir)) == ["manifest.json", "model.int8.onnx", "model.onnx", "model.opt.onnx"]


def test_int8_tagger_finds_nearly_the_same_entities_as_fp32(output_dir):
    from ner_compress.deploy.backends import load_tagger
    from ner_compress.core.config import Config
    from ner_compress.data.corpus import load_splits

    static = str(exported_dir(output_dir))
    texts = ["".join(s.chars) for s in load_splits(Config(**onnx_manifest(output_dir)["config"])).test]
    fp32 = load_tagger(static, "onnxruntime").predict(texts)
    int8 = load_tagger(static, "onnxruntime", precision="int8").predict(texts)
    pairs = [(e["start"], e["end"], e["type"]) for r in fp32 for e in r["entities"]]
    same = sum(len({(e["start"], e["end"], e["type"]) for e in a["entities"]}
                   & {(e["start"], e["end"], e["type"]) for e in b["entities"]}) for a, b in zip(fp32, int8))
    assert len(pairs) > 100 and same / len(pairs) > 0.9
    assert int8 != fp32 or same == len(pairs)  # INT8 really ran a different graph (or agreed everywhere)


def test_unknown_or_unsupported_precision_is_refused_in_one_line(output_dir):
    from ner_compress.deploy.backends import check_backend

    static = str(exported_dir(output_dir))
    with pytest.raises(UserError, match=r"^--precision int4: unknown; use one of fp32, fp16, int8$"):
        check_backend("onnxruntime", static, "int4")
    with pytest.raises(UserError, match=r"^--precision int8: ONNX Runtime's export only"):
        check_backend("paddle", static, "int8")


def test_int8_that_loses_more_than_the_margin_is_refused_and_fp32_stays(output_dir, tmp_path):
    from ner_compress.core.artifacts import read_manifest
    from ner_compress.deploy.backends import check_backend

    out = copy_stages(output_dir, tmp_path / "refused")
    result = tool("export.py", "--teacher", "--output_dir", out, "--int8_max_f1_drop", -1, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --int8_max_f1_drop -1: dynamic INT8 drops dev F1 by ") and "points (" in last
    assert "onnx_quantizer" not in result.stderr and "pre-processing" not in result.stderr  # issue 31: quiet
    onnx_dir = exported_dir(out, "onnx")
    manifest = read_manifest(str(onnx_dir), "export")  # every FP32 file as hashed
    assert {"model.onnx", "model.opt.onnx"} == set(manifest["weights_sha256"])
    assert manifest["onnx"]["int8"]["refused"] == last[len("error: "):]
    tried = manifest["onnx"]["int8"]["tried"]  # the whole graph, then with the most sensitive layers in FP32
    assert tried[0]["nodes_fp32"] == [] and len(tried) > 1 and all(t["nodes_fp32"] for t in tried[1:])
    assert not (onnx_dir / "model.int8.onnx").exists()
    static = str(exported_dir(out))
    check_backend("onnxruntime", static)  # FP32 still serves
    with pytest.raises(UserError, match="model.int8.onnx; re-export"):
        check_backend("onnxruntime", static, "int8")


def test_static_qdq_int8_is_calibrated_and_checked_the_same_way(output_dir, tmp_path):
    out = copy_stages(output_dir, tmp_path / "static")
    tool("export.py", "--teacher", "--output_dir", out, "--onnx_int8_method", "static")
    int8 = onnx_manifest(out)["onnx"]["int8"]
    assert int8["method"] == "static" and int8["refused"] is None and int8["entity_agreement_f1"] > 90
    ops = op_types(exported_dir(out, "onnx") / "model.int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear", "Attention"} <= ops  # activations too, not weights only


def test_predict_tool_takes_precision(output_dir):
    static = exported_dir(output_dir)
    result = tool("predict.py", "--model_dir", static, "--text", "北京大学", "--precision", "int8")
    assert json.loads(result.stdout.strip().splitlines()[0])["text"] == "北京大学"
    refused = tool("predict.py", "--model_dir", static, "--text", "北京", "--precision", "int8", "--backend", "paddle",
                   check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: --precision int8: ")


def test_the_pipeline_goes_on_when_an_int8_copy_is_refused(monkeypatch):
    """run_pipeline (and an FP32 search) keeps the FP32 export and logs the refusal; any other error still stops it."""
    from ner_compress.commands import stages
    from ner_compress.core.errors import Int8Refused, UserError
    from ner_compress.core.layout import ModelRef

    def refuse(cfg, ref, data):
        raise Int8Refused("--int8_max_f1_drop 1: dynamic INT8 drops dev F1 by 1.27 points")

    warnings = []  # captured here: the project's logger may not propagate to pytest's handler
    monkeypatch.setattr(stages.log, "warning", lambda fmt, *args: warnings.append(fmt % args))
    monkeypatch.setattr(stages, "run_export", refuse)
    stages.export_keeping_fp32(None, ModelRef("teacher", 0.5), None)
    assert warnings == ["INT8 not kept: --int8_max_f1_drop 1: dynamic INT8 drops dev F1 by 1.27 points"]

    def broken(cfg, ref, data):
        raise UserError("export parity failed")

    monkeypatch.setattr(stages, "run_export", broken)
    with pytest.raises(UserError, match="export parity failed"):
        stages.export_keeping_fp32(None, ModelRef("teacher", 0.5), None)


def test_int8_search_off_writes_the_whole_graph_copy_or_nothing(output_dir, tmp_path):
    out = copy_stages(output_dir, tmp_path / "off")
    tool("export.py", "--teacher", "--output_dir", out, "--int8_search", "off", "--int8_max_f1_drop", 100)
    int8 = onnx_manifest(out)["onnx"]["int8"]
    assert int8["search"] == "off" and int8["configuration"] == "whole graph" and int8["nodes_fp32"] == []
    assert len(int8["tried"]) == 1 and int8["sensitivity"] == {}
    ops = [n.op_type for n in onnx.load(str(exported_dir(out, "onnx") / "model.int8.onnx")).graph.node]
    assert "MatMul" not in ops and "Attention" not in ops  # every weight node quantized
    refused = tool("export.py", "--teacher", "--output_dir", out, "--int8_search", "off", "--int8_max_f1_drop", -1,
                   check=False)
    assert refused.returncode == 2 and len(onnx_manifest(out)["onnx"]["int8"]["tried"]) == 1  # no search


def test_a_searched_copy_records_and_keeps_the_nodes_it_left_in_fp32(output_dir, tmp_path):
    """A margin just below the whole graph's loss forces the search; whatever it keeps, the manifest names the
    nodes left in FP32 and the INT8 graph has them unquantized."""
    whole = onnx_manifest(output_dir)["onnx"]["int8"]["f1_drop_points"]
    out = copy_stages(output_dir, tmp_path / "searched")
    tool("export.py", "--teacher", "--output_dir", out, "--int8_max_f1_drop", whole - 1e-6, check=False)
    int8 = onnx_manifest(out)["onnx"]["int8"]
    assert int8["tried"][0]["configuration"] == "whole graph" and not int8["tried"][0]["passed"]
    ranked = int8["sensitivity"]["dynamic"]
    assert {r["layer"] for r in ranked} == {"embeddings", "layer 0", "layer 1", "head"}  # the tiny BERT's 2 layers
    singles, combined = int8["tried"][1:4], int8["tried"][4:]  # the 3 most sensitive alone, then together
    assert [t["nodes_fp32"] for t in singles] == [r["nodes"] for r in ranked[:len(singles)]]
    assert all(len(t["layers_fp32"]) > 1 for t in combined)
    if int8["refused"] is None:
        graph = {n.name: n.op_type for n in onnx.load(str(exported_dir(out, "onnx") / "model.int8.onnx")).graph.node}
        assert int8["nodes_fp32"] and all(name in graph for name in int8["nodes_fp32"])
        assert int8["f1_drop_points"] <= int8["max_f1_drop"] and int8["speedup_vs_fp32_b32"] > 0


def test_calibration_reads_training_windows_only(output_dir, monkeypatch, tmp_path):
    """Static calibration and the sensitivity pass are fed training windows: none of dev's, which decides."""
    import shutil

    from ner_compress.core.config import Config
    from ner_compress.deploy import onnx_quant, onnx_variants
    from ner_compress.models.model_data import prepare_data

    cfg = Config(**{**onnx_manifest(output_dir)["config"], "onnx_int8_method": "static", "int8_search": "off",
                    "int8_max_f1_drop": 100})
    data = prepare_data(cfg)
    fed = []
    quantize = onnx_quant.quantize
    monkeypatch.setattr(onnx_quant, "quantize", lambda method, src, dst, feeds=(), exclude=(), cache=None: (
        fed.extend(feeds), quantize(method, src, dst, feeds, exclude, cache))[1])
    fp32 = tmp_path / "model.opt.onnx"  # the copy is written beside it, not into the module's export
    shutil.copyfile(exported_dir(output_dir, "onnx") / "model.opt.onnx", fp32)
    record = onnx_variants.int8_variant(cfg, data, str(exported_dir(output_dir)), str(fp32))
    assert record["calibration"]["split"] == "train" and record["calibration"]["sentences"] == 128
    rows = {tuple(row[row != data.encoder.pad_id]) for feed in fed for row in feed["input_ids"]}
    train = {tuple(w.input_ids) for w in data.windows("train")}
    dev = {tuple(w.input_ids) for w in data.windows("dev")}
    assert len(rows) > 100 and rows <= train and not rows <= dev
