"""Feature recording and the masked distillation losses."""
import copy

import numpy as np
import paddle
import pytest

from ner_compress.compress import distill_losses
from ner_compress.compress.distill_losses import FEATURE_LOSSES, FeatureRecorder
from ner_compress.models.encoder_changes import use_pre_layer_norm


def tensors(seed, shape=(2, 5, 8)):
    rng = np.random.RandomState(seed)
    return paddle.to_tensor(rng.randn(*shape).astype("float32"))


LABELS = paddle.to_tensor([[-100, 1, 0, 2, -100], [-100, 0, -100, -100, -100]], dtype="int64")


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_feature_loss_is_zero_for_identical_inputs_and_positive_otherwise(name):
    loss = FEATURE_LOSSES[name]
    mask = distill_losses.real_token_mask(LABELS)
    a, b = tensors(0), tensors(1)
    assert float(loss(a, a, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(a, b, mask)) > 0.01


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_feature_loss_ignores_masked_positions(name):
    loss = FEATURE_LOSSES[name]
    mask = distill_losses.real_token_mask(LABELS)
    a, b = tensors(0), tensors(1)
    changed = b.numpy().copy()
    changed[:, 0] += 100.0  # [CLS]
    changed[1, 2:] -= 50.0  # padding
    assert float(loss(a, paddle.to_tensor(changed), mask)) == pytest.approx(float(loss(a, b, mask)), rel=1e-5)


def test_masked_mse_equals_numpy():
    a, b = tensors(2), tensors(3)
    mask = distill_losses.real_token_mask(LABELS)
    keep = LABELS.numpy() != -100
    expected = ((a.numpy() - b.numpy()) ** 2)[keep].mean()
    assert float(distill_losses.masked_mse(a, b, mask)) == pytest.approx(float(expected), rel=1e-5)
    # with a global count (several processes) the sum is divided by that count instead
    assert float(distill_losses.masked_mse(a, b, mask, 8.0)) == pytest.approx(float(expected) * 4 / 8, rel=1e-5)


def test_soft_cross_entropy_sum_ignores_special_positions():
    student = paddle.to_tensor(np.random.RandomState(0).randn(1, 3, 4).astype("float32"))
    teacher = paddle.to_tensor(np.random.RandomState(1).randn(1, 3, 4).astype("float32"))
    labels = paddle.to_tensor([[-100, 2, -100]], dtype="int64")
    loss = float(distill_losses.soft_cross_entropy_sum(student, teacher, labels))
    s, t = student.numpy()[0, 1], teacher.numpy()[0, 1]
    p_t = np.exp(t) / np.exp(t).sum()
    log_p_s = s - np.log(np.exp(s).sum())
    assert loss == pytest.approx(float(-(p_t * log_p_s).sum()), rel=1e-5)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_feature_recorder_numbers_features_as_paddlenlp_does(tiny_bert, pre_ln):
    model = tiny_bert
    if pre_ln:  # the last hidden state is the final LayerNorm's output
        model = copy.deepcopy(tiny_bert)
        use_pre_layer_norm(model)
        model.eval()
    recorder = FeatureRecorder(model)
    ids = paddle.to_tensor([[101, 2476, 676, 102]], dtype="int64")
    with paddle.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True, return_dict=True)
    assert recorder.layers == len(out.hidden_states) - 1 == 2
    for i, expected in enumerate(out.hidden_states):
        np.testing.assert_array_equal(recorder.hidden(i).numpy(), expected.numpy())
    for i, expected in enumerate(out.attentions, 1):
        np.testing.assert_array_equal(recorder.attention(i).numpy(), expected.numpy())
    with paddle.no_grad():
        model(input_ids=ids)
    recorder.remove()
    fresh = FeatureRecorder(model)
    with paddle.no_grad():
        model(input_ids=ids)
    with pytest.raises(KeyError, match="output_attentions"):
        fresh.attention(1)
