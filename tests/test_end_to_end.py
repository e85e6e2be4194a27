"""The four tools as a user runs them, on configs/tiny.yaml, into a temporary directory."""
import json
import os

import pytest
from conftest import run_tool as tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_line(text):
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    tool("train_teacher.py", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--output_dir", out)
    # no --config: the OFA stage inherits the teacher's recorded config
    tool("ofa_compress.py", "--width_mult_list", 1.0, 0.5, "--output_dir", out)
    tool("export.py", "--width_mult", 0.5, "--output_dir", out)
    return out


def test_stages_leave_self_describing_artifacts(pipeline_dir):
    teacher = json.load(open(pipeline_dir / "teacher" / "manifest.json"))
    assert teacher["stage"] == "teacher"
    assert teacher["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert teacher["config"]["hidden_size"] == 64 and teacher["config"]["train_limit"] == 400
    assert "model.safetensors" in teacher["weights_sha256"]
    ofa = json.load(open(pipeline_dir / "ofa" / "width_0.5" / "manifest.json"))
    assert ofa["width_mult"] == 0.5
    assert ofa["config"]["hidden_size"] == 64  # inherited, not the 768 default
    assert ofa["inputs"]["teacher"]["weights_sha256"] == teacher["weights_sha256"]
    static = json.load(open(pipeline_dir / "export" / "width_0.5" / "static" / "manifest.json"))
    assert all(d < 1e-4 for d in static["metrics"]["parity_max_abs_diff"].values())
    assert not [p for p in os.listdir(pipeline_dir) if ".partial-" in p]


def test_exported_dynamic_model_reloads_at_half_width(pipeline_dir):
    import ner_compress  # noqa: F401
    from ner_compress.modeling import PrunedBertForTokenClassification

    model = PrunedBertForTokenClassification.from_pretrained(str(pipeline_dir / "export" / "width_0.5" / "dynamic"))
    layer = model.bert.encoder.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.weight.shape == [64, 64]


def test_predict_prints_one_json_object_per_text(pipeline_dir):
    long_text = "北京" * 100  # longer than max_seq_length 64: windows, nothing dropped
    result = tool("predict.py", "--model_dir", pipeline_dir / "export" / "width_0.5" / "static",
                  "--text", "中国人民银行在北京开会", "--text", long_text)
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["text"] for r in records] == ["中国人民银行在北京开会", long_text]
    for record in records:
        for ent in record["entities"]:
            assert record["text"][ent["start"]:ent["end"]] == ent["text"]
            assert ent["type"] in {"PER", "LOC", "ORG"}


def test_untrained_width_is_refused_and_export_kept(pipeline_dir):
    before = sorted(os.listdir(pipeline_dir / "export" / "width_0.5" / "static"))
    result = tool("export.py", "--width_mult", 0.75, "--output_dir", pipeline_dir, check=False)
    assert result.returncode == 2
    assert "--width_mult 0.75: not trained" in last_line(result.stderr)
    assert sorted(os.listdir(pipeline_dir / "export" / "width_0.5" / "static")) == before


def test_missing_teacher_names_the_command(tmp_path):
    result = tool("ofa_compress.py", "--output_dir", tmp_path, check=False)
    assert result.returncode == 2
    assert "tools/train_teacher.py" in last_line(result.stderr)


def test_bad_training_file_fails_with_file_and_line(tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text("中\tB-PER\n国\tI-PER\n人\n", encoding="utf-8")
    result = tool("train_teacher.py", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
                  "--train_file", bad, "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert f"{bad}:3:" in last_line(result.stderr)
    assert not (tmp_path / "out" / "teacher").exists()


def test_teacher_from_local_pretrained_directory(pipeline_dir, tmp_path):
    """--model_name_or_path with a directory: here the teacher the fixture saved."""
    tool("train_teacher.py", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--max_steps", 1,
         "--eval_steps", 1, "--model_name_or_path", pipeline_dir / "teacher", "--output_dir", tmp_path)
    manifest = json.load(open(tmp_path / "teacher" / "manifest.json"))
    assert manifest["config"]["model_name_or_path"] == str(pipeline_dir / "teacher")
    assert manifest["metrics"]["dev_f1"] >= 0.0
