"""The student stage: layer initialisation, the match losses, refusals, export, two processes, resume."""
import json
import subprocess

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from conftest import NO_DROPOUT, ROOT, STUDENT_MATCHES, TINY_LABELS, checkpoints_dir, copy_stages, exported_dir, \
    launch, max_weight_diff, run_tool, tool_command, trained_dir, wait_for
from ner_compress.core import layout
from ner_compress.commands import stages
from ner_compress.compress import student
from ner_compress.core.config import Config
from ner_compress.compress.distill_losses import FEATURE_LOSSES, attention_loss
from ner_compress.core.errors import UserError
from ner_compress.compress.matches import parse_matches
from ner_compress.models.modeling import count_parameters

SMALL = ["--student_num_layers", 1, "--student_hidden_size", 32, "--student_num_attention_heads", 2,
         "--student_intermediate_size", 64, "--intermediate_matches", STUDENT_MATCHES, "--save_steps", 2,
         "--save_total_limit", 10, "--student_eval_steps", 4, *NO_DROPOUT]


def bert(layers=4, hidden=32, heads=4, ffn=64, seed=7):
    from paddlenlp.transformers import BertConfig, BertForTokenClassification

    paddle.seed(seed)
    model = BertForTokenClassification(BertConfig(
        vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, num_labels=len(TINY_LABELS), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.2))  # peaked attention, not uniform
    model.eval()
    return model


def make_student(teacher, **sizes):
    from paddlenlp.transformers import BertForTokenClassification

    cfg = Config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 **{f"student_{k}": v for k, v in sizes.items()})
    config, matches = student.student_plan(cfg, teacher.config)
    model = BertForTokenClassification(config)
    model.eval()
    return model, student.init_from_teacher(model, teacher), matches, cfg


def batch(seed=0, pad_tail=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(5, 60, size=(3, 9))
    labels = rng.randint(0, len(TINY_LABELS), size=(3, 9))
    labels[:, 0] = labels[:, -1 - pad_tail:] = -100
    if pad_tail:
        ids[:, -pad_tail:] = 0
    return {"input_ids": paddle.to_tensor(ids), "token_type_ids": paddle.zeros([3, 9], "int64"),
            "labels": paddle.to_tensor(labels)}


def states(model, prefix):
    return {k[len(prefix):]: v.numpy() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_half_depth_student_copies_every_second_layer_exactly():
    teacher = bert()
    model, layers, _, _ = make_student(teacher, num_layers=2)
    assert layers == [1, 3]
    for i, j in enumerate(layers):
        s, t = states(model, f"bert.encoder.layers.{i}."), states(teacher, f"bert.encoder.layers.{j}.")
        assert sorted(s) == sorted(t) and all(np.array_equal(s[k], t[k]) for k in s)
    for prefix in ("bert.embeddings.", "classifier."):
        s, t = states(model, prefix), states(teacher, prefix)
        assert s and all(np.array_equal(s[k], t[k]) for k in s)
    # each student layer computes its teacher layer's function: same input, same hidden state out
    b = batch()
    kwargs = {"input_ids": b["input_ids"], "token_type_ids": b["token_type_ids"], "output_hidden_states": True,
              "return_dict": True}
    with paddle.no_grad():
        t_hidden = teacher(**kwargs).hidden_states
        s_hidden = model(**kwargs).hidden_states
        assert np.array_equal(s_hidden[0].numpy(), t_hidden[0].numpy())
        for i, j in enumerate(layers):
            out = model.bert.encoder.layers[i](t_hidden[j])
            assert np.abs(out.numpy() - t_hidden[j + 1].numpy()).max() < 1e-6
        assert np.abs(model.bert.encoder.layers[0](t_hidden[0]).numpy() - t_hidden[1].numpy()).max() > 1e-3


def test_full_depth_student_is_the_teacher_and_another_hidden_size_copies_nothing():
    teacher = bert()
    model, layers, _, _ = make_student(teacher)
    assert layers == [0, 1, 2, 3]
    b = batch()
    with paddle.no_grad():
        assert np.array_equal(model(b["input_ids"], b["token_type_ids"]).numpy(),
                              teacher(b["input_ids"], b["token_type_ids"]).numpy())
    narrow, layers, _, _ = make_student(teacher, hidden_size=16, num_attention_heads=2)
    assert layers == []
    assert narrow.bert.embeddings.word_embeddings.weight.shape == [60, 16]


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_feature_losses_are_zero_for_identical_inputs_and_positive_otherwise(loss):
    rng = np.random.RandomState(0)
    mask = paddle.to_tensor(np.array([1, 1, 1, 0], "float32").reshape(1, 4, 1))
    hidden = paddle.to_tensor(rng.randn(1, 4, 8).astype("float32"))
    assert float(FEATURE_LOSSES[loss](hidden, hidden, mask)) < 1e-6
    assert float(FEATURE_LOSSES[loss](hidden, hidden * -1.0 + 0.5, mask)) > 1e-3
    probs = paddle.nn.functional.softmax(paddle.to_tensor(rng.randn(1, 4, 4, 4).astype("float32")), -1)
    assert float(attention_loss(loss, probs, probs, mask)) < 1e-6
    assert float(attention_loss(loss, probs, paddle.flip(probs, axis=[1]), mask)) > 1e-4
    # 2 heads against 4: compared on the mean over heads
    pairs = (probs[:, 0::2] + probs[:, 1::2]) / 2
    assert float(attention_loss(loss, pairs, probs, mask)) < 1e-6
    assert float(attention_loss(loss, probs[:, :2], probs, mask)) > 1e-4


def test_student_step_reads_a_frozen_teacher_copy_and_leaves_the_teacher_alone():
    teacher = bert()
    teacher.train()
    model, _, matches, cfg = make_student(teacher, num_layers=2)
    distiller = student.StudentDistiller(teacher, model, matches, cfg)
    seen = []
    distiller.teacher.register_forward_pre_hook(lambda layer, inputs: seen.append(layer.training))
    model.train()
    distiller.step(batch())
    assert seen == [False]  # the copy runs once, dropout off
    assert all(p.stop_gradient for p in distiller.teacher.parameters())
    assert any(p.grad is not None for p in model.parameters())
    assert teacher.training and not any(p.stop_gradient for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_every_match_of_a_student_that_is_the_teacher_is_zero_and_positive_once_perturbed():
    teacher = bert()
    spec = [{"student_layer": s, "teacher_layer": s, "feature": f, "loss": loss}
            for s in (1, 4) for f in ("hidden", "attention") for loss in ("mse", "cosine")]
    spec.append({"student_layer": 0, "teacher_layer": 0, "feature": "hidden"})
    model, _, _, cfg = make_student(teacher)
    distiller = student.StudentDistiller(teacher, model, parse_matches(spec, 4, 4, 0.1), cfg)
    b = batch(pad_tail=2)
    losses = distiller.step(b)
    assert len(losses) == len(spec) + 2  # the total and the logit term
    assert all(abs(v) < 1e-5 for k, v in losses.items() if k != "loss" and k != "logit"), losses
    layer = model.bert.encoder.layers[0]
    for weight in (layer.linear1.weight, layer.self_attn.q_proj.weight):
        weight.set_value(paddle.randn(weight.shape))
    perturbed = distiller.step(b)
    changed = {k: v for k, v in perturbed.items() if k not in ("loss", "logit", "hidden_mse_s0_t0")}
    assert len(changed) == len(spec) - 1 and all(v > 1e-3 for v in changed.values()), changed


@pytest.fixture(scope="module")
def composed(tiny_run, tmp_path_factory):
    """The shared run's teacher (copied) -> projected student -> its export, its width supernet and width 0.5
    export. The teacher distils in eval mode; the student's dropout is off (SMALL), so two processes can match
    one."""
    out = copy_stages(tiny_run, tmp_path_factory.mktemp("student"))
    run_tool("distill.py", "--output_dir", out, *SMALL, "--student_max_steps", 4)
    run_tool("export.py", "--output_dir", out, "--student")
    run_tool("ofa_compress.py", "--output_dir", out, "--from", "student", "--ofa_max_steps", 2,
             "--ofa_eval_steps", 2)
    run_tool("export.py", "--output_dir", out, "--from", "student", "--width_mult", 0.5)
    return out


def test_projection_is_trained_but_absent_from_the_student_and_its_export(composed):
    from paddlenlp.transformers import BertConfig, BertForTokenClassification

    checkpoint = load_file(str(checkpoints_dir(composed, "student") / "step-00000004" / "model.safetensors"))
    assert sorted(k for k in checkpoint if k.startswith("projections.")) == [
        "projections.hidden_cosine_s1_t2.bias", "projections.hidden_cosine_s1_t2.weight",
        "projections.hidden_mse_s0_t0.bias", "projections.hidden_mse_s0_t0.weight"]
    fresh = BertForTokenClassification(BertConfig.from_pretrained(str(trained_dir(composed, "student"))))
    saved = load_file(str(trained_dir(composed, "student") / "model.safetensors"))
    assert sorted(saved) == sorted(fresh.state_dict())
    manifest = json.load(open(trained_dir(composed, "student") / "manifest.json"))
    assert manifest["stage"] == "student" and manifest["parameters"] == count_parameters(fresh)
    assert manifest["inputs"]["teacher"] == json.load(open(trained_dir(composed) / "manifest.json"))
    exported = load_file(str(exported_dir(composed, "dynamic", "student") / "model.safetensors"))
    assert sorted(exported) == sorted(fresh.state_dict())
    static = json.load(open(exported_dir(composed, "static", "student") / "manifest.json"))
    assert static["parameters"] == count_parameters(fresh)


def test_student_and_its_width_reload_and_pass_parity(composed):
    from paddlenlp.transformers import BertForTokenClassification

    from ner_compress.models.families import PrunedBertForTokenClassification

    model = BertForTokenClassification.from_pretrained(str(trained_dir(composed, "student")))
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    for width in (None, 0.5):
        reloaded = PrunedBertForTokenClassification.from_pretrained(str(exported_dir(composed, "dynamic", "student",
                                                                                     width)))
        assert reloaded.config.hidden_size == 32
        for sub in ("dynamic", "static"):
            metrics = json.load(open(exported_dir(composed, sub, "student", width) / "manifest.json"))["metrics"]
            assert max(metrics["parity_max_abs_diff"].values()) < 1e-4
    assert reloaded.bert.encoder.layers[0].self_attn.num_heads == 1
    ofa = json.load(open(trained_dir(composed, "student", 0.5) / "manifest.json"))
    assert ofa["inputs"]["teacher"]["stage"] == "student"  # the supernet's teacher is the student
    assert [ref.name for ref in layout.exported_models(str(composed))] == ["student", "student width 0.5"]


def test_two_processes_equal_one_process_with_the_global_batch(composed, tmp_path):
    two = tmp_path / "two"
    copy_stages(composed, two)
    launch(2, "distill.py", two, *SMALL, "--student_max_steps", 4, "--per_device_train_batch_size", 8)
    for step in (2, 4):
        name = f"step-{step:08d}"
        one = load_file(str(checkpoints_dir(composed, "student") / name / "model.safetensors"))
        two_weights = load_file(str(checkpoints_dir(two, "student") / name / "model.safetensors"))
        assert max_weight_diff(one, two_weights) < 1e-4
    histories = [json.load(open(checkpoints_dir(d, "student") / "step-00000004" / "trainer_state.json"))["history"]
                 for d in (composed, two)]
    for a, b in zip(*histories):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_sigkill_then_resume_gives_identical_weights(composed, tmp_path):
    copy_stages(composed, tmp_path)
    args = [*SMALL, "--student_max_steps", 12, "--output_dir", tmp_path]
    reference = tmp_path / "reference"
    copy_stages(composed, reference)
    run_tool("distill.py", "--output_dir", reference, *SMALL, "--student_max_steps", 12)
    proc = subprocess.Popen(tool_command("distill.py", *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(checkpoints_dir(tmp_path, "student") / "step-00000006" / "trainer_state.json", proc)
    proc.kill()
    proc.wait()
    assert not (checkpoints_dir(tmp_path, "student") / "step-00000012").exists()
    result = run_tool("distill.py", *args, "--resume")
    assert "resumed from" in result.stderr, result.stderr[-2000:]
    final = [load_file(str(checkpoints_dir(d, "student") / "step-00000012" / "model.safetensors"))
             for d in (reference, tmp_path)]
    assert any(k.startswith("projections.") for k in final[0]) and max_weight_diff(*final) < 1e-6


BAD = [
    ("student_layer", [{"student_layer": 2, "teacher_layer": 2, "feature": "hidden"}]),
    ("teacher_layer", [{"student_layer": 1, "teacher_layer": 3, "feature": "attention"}]),
    ("feature", [{"student_layer": 1, "teacher_layer": 2, "feature": "logits"}]),
    ("loss", [{"student_layer": 1, "teacher_layer": 2, "feature": "hidden", "loss": "kl"}]),
    ("teacher_layer", [{"student_layer": 1, "teacher_layer": 0, "feature": "attention"}]),
]


@pytest.mark.parametrize("field,spec", BAD)
def test_a_match_that_cannot_map_is_refused_naming_the_field(composed, field, spec):
    with pytest.raises(UserError) as err:
        stages.distill_cli(["--output_dir", str(composed), "--student_num_layers", "1",
                              "--intermediate_matches", json.dumps(spec)])
    message = str(err.value)
    assert f"intermediate_matches[0].{field}" in message and "\n" not in message


def test_bad_student_shapes_and_inputs_are_refused_in_one_line(composed, tmp_path):
    for args, expected in ((["--student_num_layers", "3"], "--student_num_layers 3"),
                           (["--student_hidden_size", "30"], "--student_hidden_size 30"),
                           (["--intermediate_matches", "{oops"], "intermediate_matches")):
        with pytest.raises(UserError, match=expected.replace("[", r"\[")):
            stages.distill_cli(["--output_dir", str(composed), *args])
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "张", "三"]) + "\n", encoding="utf-8")
    result = run_tool("distill.py", "--output_dir", composed, "--vocab_file", vocab, check=False)
    assert result.returncode == 2 and "vocabulary" in result.stderr.strip().splitlines()[-1]
