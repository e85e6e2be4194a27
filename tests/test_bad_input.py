"""Every problem a user can fix is a ``UserError`` that says where: file and line, key, or command."""
import argparse
import os
import re

import pytest
import yaml

from ner_compress.core import artifacts, config
from ner_compress.data import corpus as data
from ner_compress.core.config import Config
from ner_compress.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


# --- corpus files --------------------------------------------------------------------------

@pytest.mark.parametrize("bad_line", ["张 B-PER extra", "张三\tO", "张\tX-PER", "张\tB-", "张"])
def test_bad_line_names_file_and_line(write_file, bad_line):
    path = write_file("bad.txt", f"我\tO\n们\tO\n\n{bad_line}\n好\tO\n")
    with pytest.raises(UserError) as err:
        data.read_conll_chars(path)
    assert f"{path}:4" in str(err.value)


def test_unknown_tag_is_named(write_file):
    path = write_file("tag.txt", "我\tO\n们\tX-PER\n")
    with pytest.raises(UserError, match="X-PER") as err:
        data.read_conll_chars(path)
    assert f"{path}:2" in str(err.value)


def test_invalid_utf8_names_file_and_line(write_file):
    path = write_file("latin.txt", "我\tO\n".encode("utf-8") + b"\xff\xfe\tO\n" + "们\tO\n".encode("utf-8"))
    with pytest.raises(UserError, match="UTF-8") as err:
        data.read_conll_chars(path)
    assert f"{path}:2" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_names_the_file(write_file, content):
    path = write_file("empty.txt", content)
    with pytest.raises(UserError) as err:
        data.read_conll_chars(path)
    assert path in str(err.value)


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(UserError) as err:
        data.read_conll_chars(path)
    assert path in str(err.value)


def test_i_after_o_repaired_by_default_refused_when_strict(write_file):
    path = write_file("repair.txt", "我\tO\n张\tI-PER\n三\tI-PER\n\n李\tI-PER\n")
    sents = data.read_conll_chars(path)
    assert [s.tags for s in sents] == [["O", "B-PER", "I-PER"], ["B-PER"]]
    with pytest.raises(UserError, match="I-PER") as err:
        data.read_conll_chars(path, strict_tags=True)
    assert f"{path}:2" in str(err.value)


def test_strict_refuses_i_at_sentence_start(write_file):
    path = write_file("start.txt", "我\tO\n\n李\tI-PER\n")
    with pytest.raises(UserError) as err:
        data.read_conll_chars(path, strict_tags=True)
    assert f"{path}:3" in str(err.value)


def test_i_of_another_type_is_repaired(write_file):
    path = write_file("types.txt", "张\tB-PER\n京\tI-LOC\n市\tI-LOC\n")
    (sent,) = data.read_conll_chars(path)
    assert sent.tags == ["B-PER", "B-LOC", "I-LOC"]
    with pytest.raises(UserError) as err:
        data.read_conll_chars(path, strict_tags=True)
    assert f"{path}:2" in str(err.value)


def test_valid_strict_file_is_read_unchanged(write_file):
    path = write_file("ok.txt", "张\tB-PER\n三\tI-PER\n在\tO\n")
    assert data.read_conll_chars(path, strict_tags=True)[0].tags == ["B-PER", "I-PER", "O"]


def test_local_test_file_with_unseen_label_is_refused(write_file):
    train = write_file("train.txt", "张\tB-PER\n三\tI-PER\n\n" * 3)
    test = write_file("test.txt", "北\tB-LOC\n")
    dev = write_file("dev.txt", "张\tB-PER\n")
    with pytest.raises(UserError, match="B-LOC") as err:
        data.load_splits(Config(train_file=train, test_file=test, dev_file=dev))
    assert test in str(err.value)


# --- configuration -------------------------------------------------------------------------

def test_yaml_unknown_key_names_key_and_file(write_file):
    path = write_file("c.yaml", "max_seq_length: 64\nhiden_size: 32\n")
    with pytest.raises(UserError) as err:
        config.load_yaml(path)
    assert "hiden_size" in str(err.value) and path in str(err.value)


def test_each_stage_schedule_is_read_from_its_prefixed_yaml_keys_and_a_near_miss_is_refused(write_file):
    path = write_file("c.yaml", "max_steps: 7\nofa_max_steps: 5\nofa_learning_rate: 0.01\nstudent_eval_steps: 3\n")
    cfg = Config(**config.load_yaml(path))
    assert (cfg.schedule("teacher").max_steps, cfg.schedule("ofa").max_steps, cfg.schedule("student").max_steps) == \
        (7, 5, -1)
    assert cfg.schedule("ofa").learning_rate == 0.01 and cfg.schedule("student").eval_steps == 3
    assert cfg.schedule("student").learning_rate == 1e-4  # each stage keeps its own default
    bad = write_file("d.yaml", "ofa_warmup_steps: 10\n")
    with pytest.raises(UserError) as err:
        config.load_yaml(bad)
    assert "ofa_warmup_steps" in str(err.value) and bad in str(err.value) and "\n" not in str(err.value)


def test_a_config_records_only_the_options_that_apply():
    fresh = Config(hidden_size=64, num_attention_heads=4).to_dict()
    assert (fresh["hidden_size"], fresh["num_attention_heads"]) == (64, 4)
    pretrained = Config(model_name_or_path="some/dir").to_dict()
    assert not set(config.FRESH_MODEL_ONLY) & set(pretrained)  # the model's own sizes apply, not the defaults
    assert pretrained["model_name_or_path"] == "some/dir" and Config(**pretrained).model_name_or_path == "some/dir"


@pytest.mark.parametrize("flag", ["eval_steps", "ofa_eval_steps", "student_eval_steps"])
def test_an_evaluation_interval_below_one_is_refused_naming_its_flag(flag):
    with pytest.raises(UserError, match=f"--{flag} 0"):
        config.validate(Config(**{flag: 0}))


@pytest.mark.parametrize("text, key", [("max_seq_length: abc\n", "max_seq_length"),
                                       ("learning_rate: fast\n", "learning_rate"),
                                       ("strict_tags: 3\n", "strict_tags"),
                                       ("width_mult_list: [1.0, half]\n", "width_mult_list")])
def test_yaml_bad_type(write_file, text, key):
    path = write_file("c.yaml", text)
    with pytest.raises(UserError) as err:
        config.load_yaml(path)
    assert key in str(err.value) and path in str(err.value)


@pytest.mark.parametrize("text", ["max_seq_length: 64.7\n", "seed: true\n"])
def test_yaml_non_integer_for_int_option_is_refused(write_file, text):
    path = write_file("c.yaml", text)
    with pytest.raises(UserError):
        config.load_yaml(path)


def test_yaml_syntax_error_names_line(write_file):
    path = write_file("c.yaml", "seed: 1\nmax_seq_length: 64\nwidth_mult_list: [1, 0.5]]\nlearning_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        config.load_yaml(path)
    assert str(err.value).startswith(f"{path}:3: invalid YAML")  # the stray "]" is on line 3


def test_yaml_values_are_coerced(write_file):
    path = write_file("c.yaml", "max_seq_length: 64\nwidth_mult_list: [1, 0.5]\ntrain_limit: null\n")
    assert config.load_yaml(path) == {"max_seq_length": 64, "width_mult_list": [1.0, 0.5], "train_limit": None}


def test_resolve_config_precedence(write_file):
    yaml_path = write_file("c.yaml", yaml.safe_dump({"max_seq_length": 48, "seed": 8, "output_dir": "from_yaml"}))
    seen_dirs = []

    def inherit(output_dir):
        seen_dirs.append(output_dir)
        return {"hidden_size": 64, "num_attention_heads": 4, "max_seq_length": 32, "seed": 7,
                "learning_rate": 1e-3, "not_a_field": 1}

    args = argparse.Namespace(config=yaml_path, output_dir=None, seed=9, learning_rate=None)
    cfg = config.resolve_config(args, inherit)
    defaults = Config()
    assert cfg.seed == 9  # flag beats yaml and inherit
    assert cfg.max_seq_length == 48  # yaml beats inherit
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.learning_rate) == (64, 4, 1e-3)  # inherit beats default
    assert cfg.num_hidden_layers == defaults.num_hidden_layers  # untouched default
    assert cfg.output_dir == "from_yaml"
    assert seen_dirs == ["from_yaml"]  # the previous stage is looked up where this one writes
    assert not hasattr(cfg, "not_a_field")

    args = argparse.Namespace(config=yaml_path, output_dir="from_flag", max_seq_length=100)
    cfg = config.resolve_config(args, inherit)
    assert seen_dirs[-1] == "from_flag" and cfg.output_dir == "from_flag"
    assert cfg.max_seq_length == 100 and cfg.seed == 8

    cfg = config.resolve_config(argparse.Namespace(config=None))
    assert cfg == defaults


def test_parse_config_flags_override_yaml(write_file):
    yaml_path = write_file("c.yaml", "max_seq_length: 48\nwidth_mult_list: [1.0, 0.5]\n")
    cfg, _ = config.parse_config("t", ["max_seq_length", "width_mult_list", "strict_tags"],
                                 ["--config", yaml_path, "--width_mult_list", "1.0", "0.25", "--strict_tags"])
    assert cfg.max_seq_length == 48 and cfg.width_mult_list == [1.0, 0.25] and cfg.strict_tags is True


@pytest.mark.parametrize("overrides", [{"width_mult_list": [1.0, 0.0]}, {"width_mult_list": [1.5]},
                                       {"width_mult_list": []}, {"width_mult": 0.0}, {"width_mult": 1.5},
                                       {"hidden_size": 30, "num_attention_heads": 4},
                                       {"max_seq_length": 2}, {"device": "tpu"},
                                       {"local_conv_kernel": 4}, {"local_conv_kernel": -1}])
def test_validate_rejects(overrides):
    with pytest.raises(UserError) as err:
        config.validate(Config(**overrides))
    assert f"--{next(iter(overrides))}" in str(err.value)


def test_validate_accepts_defaults_and_edges():
    from ner_compress.models.modeling import check_model_options

    for cfg in (Config(), Config(width_mult_list=[1.0, 0.125], width_mult=1.0, hidden_size=32, num_attention_heads=4),
                Config(width_mult_list=[1.0, 0.8333, 0.6667, 0.5]),  # the reference list on 12 heads
                Config(local_conv_kernel=3), Config(model_type="electra")):
        config.validate(cfg)
        check_model_options(cfg)


@pytest.mark.parametrize("width", [0.01, 0.1])
def test_model_options_refuse_a_width_that_keeps_no_head(width):
    from ner_compress.models.modeling import check_model_options

    cfg = Config(width_mult_list=[1.0, width], hidden_size=32, num_attention_heads=4)
    config.validate(cfg)  # the core cannot tell: the rule is the model's width plan
    with pytest.raises(UserError) as err:
        check_model_options(cfg)
    assert f"--width_mult {width}: keeps no attention head of 4" in str(err.value)


def test_model_options_refuse_an_unknown_family():
    from ner_compress.models.modeling import check_model_options

    with pytest.raises(UserError, match="--model_type gpt: unsupported architecture; use one of bert, ernie"):
        check_model_options(Config(model_type="gpt"))


def test_every_stage_command_checks_the_model_options():
    from ner_compress.commands import stages

    with pytest.raises(UserError, match="--model_type gpt"):
        stages.train_teacher_cli(["--model_type", "gpt"])


def test_resolve_config_validates(write_file):
    with pytest.raises(UserError, match="width"):
        config.resolve_config(argparse.Namespace(config=None, width_mult_list=[1.0, 1.5]))


# --- artifacts -----------------------------------------------------------------------------

@pytest.mark.parametrize("stage, command", [("teacher", "tools/train_teacher.py"),
                                            ("ofa", "tools/ofa_compress.py"),
                                            ("export", "tools/export.py")])
def test_missing_artifact_names_the_command_that_makes_it(tmp_path, stage, command):
    assert os.path.isfile(os.path.join(ROOT, command))  # the message points at a real tool
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(UserError) as err:
        artifacts.read_manifest(missing, stage)
    assert command in str(err.value) and missing in str(err.value)


def _finished_dir(tmp_path, stage="teacher"):
    directory = tmp_path / stage
    directory.mkdir()
    (directory / "model_state.pdparams").write_bytes(b"weights v1")
    (directory / "notes.txt").write_text("not a weight file")
    artifacts.write_manifest(str(directory), stage, {"seed": 1}, LABELS, "ab" * 32, metrics={"f1": 0.5})
    return directory


def test_manifest_round_trip(tmp_path):
    directory = _finished_dir(tmp_path)
    manifest = artifacts.read_manifest(str(directory), "teacher")
    assert manifest["labels"] == LABELS and manifest["metrics"] == {"f1": 0.5}
    assert list(manifest["weights_sha256"]) == ["model_state.pdparams"]


def test_changed_weights_are_refused(tmp_path):
    directory = _finished_dir(tmp_path)
    (directory / "model_state.pdparams").write_bytes(b"weights v2")
    with pytest.raises(UserError, match="sha256") as err:
        artifacts.read_manifest(str(directory), "teacher")
    assert "model_state.pdparams" in str(err.value) and "tools/train_teacher.py" in str(err.value)
    artifacts.read_manifest(str(directory), "teacher", verify_weights=False)  # explicitly not checked


def test_deleted_weights_are_refused(tmp_path):
    directory = _finished_dir(tmp_path)
    os.remove(directory / "model_state.pdparams")
    with pytest.raises(UserError, match="sha256"):
        artifacts.read_manifest(str(directory), "teacher")


def test_manifest_of_another_stage_is_refused(tmp_path):
    directory = _finished_dir(tmp_path, "ofa")
    with pytest.raises(UserError, match="teacher"):
        artifacts.read_manifest(str(directory), "teacher")


def test_corrupt_manifest_names_the_file(tmp_path):
    directory = _finished_dir(tmp_path)
    (directory / artifacts.MANIFEST).write_text('{"stage": "teacher",\n oops')
    with pytest.raises(UserError) as err:
        artifacts.read_manifest(str(directory), "teacher")
    assert f"{directory / artifacts.MANIFEST}:2" in str(err.value)


def test_check_same_inputs():
    manifest = {"labels": LABELS, "vocab_sha256": "ab" * 32}
    artifacts.check_same_inputs(manifest, list(LABELS), "ab" * 32, "teacher/")
    with pytest.raises(UserError, match="labels") as err:
        artifacts.check_same_inputs(manifest, LABELS[:5], "ab" * 32, "teacher/")
    assert "teacher/" in str(err.value)
    with pytest.raises(UserError, match="labels"):
        artifacts.check_same_inputs(manifest, [LABELS[0], *reversed(LABELS[1:])], "ab" * 32, "teacher/")
    with pytest.raises(UserError, match="vocabulary"):
        artifacts.check_same_inputs(manifest, LABELS, "cd" * 32, "teacher/")


def _leftovers(parent):
    return [p for p in os.listdir(parent) if ".partial-" in p or ".old-" in p]


def test_atomic_dir_failure_keeps_previous_contents(tmp_path):
    final = tmp_path / "out" / "teacher"
    final.mkdir(parents=True)
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_dir(str(final)) as tmp:
            assert os.path.isdir(tmp) and os.path.abspath(tmp) != os.path.abspath(final)
            with open(os.path.join(tmp, "new.txt"), "w") as fh:
                fh.write("new")
            raise RuntimeError("stage crashed")
    assert sorted(os.listdir(final)) == ["old.txt"]
    assert (final / "old.txt").read_text() == "old"
    assert _leftovers(final.parent) == []


def test_atomic_file_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "importance.npz"
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_file(str(final)) as tmp, open(tmp, "w") as fh:
            fh.write("half")
            raise RuntimeError("killed mid-write")
    assert final.read_text() == "old" and os.listdir(tmp_path) == ["importance.npz"]
    with artifacts.atomic_file(str(final)) as tmp, open(tmp, "w") as fh:
        fh.write("new")
    assert final.read_text() == "new" and os.listdir(tmp_path) == ["importance.npz"]


def test_atomic_dir_success_replaces_old_contents(tmp_path):
    final = tmp_path / "out" / "teacher"
    final.mkdir(parents=True)
    (final / "old.txt").write_text("old")
    with artifacts.atomic_dir(str(final)) as tmp:
        with open(os.path.join(tmp, "new.txt"), "w") as fh:
            fh.write("new")
        assert (final / "old.txt").read_text() == "old"  # untouched until the body finishes
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert (final / "new.txt").read_text() == "new"
    assert _leftovers(final.parent) == []


def test_atomic_dir_creates_missing_parents(tmp_path):
    final = tmp_path / "a" / "b" / "c"
    with artifacts.atomic_dir(str(final)) as tmp:
        open(os.path.join(tmp, "x"), "w").close()
    assert os.listdir(final) == ["x"]


def test_later_stage_inherits_data_settings_but_not_resume(tmp_path):
    import json

    from ner_compress.commands.stages import recorded_config

    (tmp_path / "teacher").mkdir()
    recorded = {"train_limit": 400, "max_seq_length": 64, "resume": True, "resume_from": "x", "output_dir": "y"}
    (tmp_path / "teacher" / "manifest.json").write_text(json.dumps({"stage": "teacher", "config": recorded}))
    assert recorded_config("teacher")(str(tmp_path)) == {"train_limit": 400, "max_seq_length": 64}
    assert recorded_config("teacher")(str(tmp_path / "nowhere")) == {}


def test_a_later_stage_refuses_a_broken_teacher_manifest_in_one_line(tmp_path):
    from ner_compress.commands.stages import recorded_config

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "manifest.json").write_text('{"stage": "teacher",\n "config": {')
    with pytest.raises(UserError, match=r"teacher/manifest.json:2: unreadable manifest"):
        recorded_config("teacher")(str(tmp_path))


def test_stage_flags_come_from_the_config_groups():
    """A new Config field appears on the command lines of the stages whose group it joins, with no list to edit."""
    import contextlib
    import io
    from dataclasses import fields

    from ner_compress.commands import pipeline, stages

    def flags(cli):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            cli(["--help"])
        return set(re.findall(r"--(\w+)", out.getvalue()))

    assert {f.name for f in fields(config.OfaOptions)} <= flags(stages.ofa_compress_cli)
    assert not {f.name for f in fields(config.StudentOptions)} & flags(stages.ofa_compress_cli)
    assert {f.name for f in fields(config.Config)} - {"width_mult"} <= flags(pipeline.run_all_cli)
