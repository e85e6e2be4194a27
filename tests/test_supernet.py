"""The OFA supernet: importance reordering, distillation step, sub-model extraction, save/load."""
import copy

import numpy as np
import paddle
import pytest

from conftest import random_bio_tags
from ner_compress.data import corpus as data
from ner_compress.models import families, modeling
from ner_compress.compress import supernet
from ner_compress.core.config import Config
from ner_compress.data.vocab import CharEncoder, load_vocab
from ner_compress.data.corpus import Sentence

LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def windows(vocab_file):
    """Windows of a few random sentences with valid BIO tags over all seven labels."""
    rng = np.random.RandomState(11)
    alphabet = list("我们在北京大学学习中文今天天气很好张三李四王五上海市政府新华社记者")
    sentences = []
    for _ in range(16):
        n = rng.randint(4, 30)
        tags = random_bio_tags(rng, n)
        sentences.append(Sentence(list(rng.choice(alphabet, n)), tags))
    encoder = CharEncoder(load_vocab(vocab_file))
    return data.encode(sentences, encoder, {label: i for i, label in enumerate(LABELS)}, 64)


@pytest.fixture
def batches(windows):
    out = supernet.importance_batches(windows, 8, 2, pad_id=0)
    assert len(out) == 2
    return out


def logits_at(ofa_model, width, batch):
    supernet.set_width(ofa_model, width)
    with paddle.no_grad():
        return ofa_model(**supernet.ofa_inputs(batch)).numpy()


def block_permutation(new, old, blocks, axis):
    """Which old block each block of ``new`` is, along ``axis`` (``None`` if any is not found)."""
    new_parts, old_parts = np.split(new, blocks, axis=axis), np.split(old, blocks, axis=axis)
    perm = []
    for part in new_parts:
        match = [j for j, o in enumerate(old_parts) if np.array_equal(part, o)]
        if len(match) != 1:
            return None
        perm.append(match[0])
    return perm


def test_importance_batches_shapes(windows):
    out = supernet.importance_batches(windows, 8, 2, pad_id=0)
    assert [tuple(b["input_ids"].shape)[0] for b in out] == [8, 8]
    assert all(isinstance(v, paddle.Tensor) for b in out for v in b.values())
    assert len(supernet.importance_batches(windows, 8, None, pad_id=0)) == -(-len(windows) // 8)


def test_importance_batches_sample_every_length_and_pad_with_the_given_id():
    rng = np.random.RandomState(3)
    lengths = rng.randint(3, 120, size=2000)
    windows = [data.Window(i, 0, np.full(n, 7, dtype="int64"), np.zeros(n, dtype="int64"))
               for i, n in enumerate(lengths)]
    out = supernet.importance_batches(windows, 32, 8, pad_id=5, seed=1)
    sampled = np.array([int((b["input_ids"].numpy() == 7).sum(1)[r]) for b in out for r in range(32)])
    assert len(sampled) == 256
    # the sample's length distribution is the dev set's (the shortest 256 would all be under 20)
    for q in (25, 50, 75):
        assert abs(np.percentile(sampled, q) - np.percentile(lengths, q)) < 12, q
    assert all(set(np.unique(b["input_ids"].numpy())) <= {5, 7} for b in out)
    again = supernet.importance_batches(windows, 32, 8, pad_id=5, seed=1)
    assert all(np.array_equal(a["input_ids"].numpy(), b["input_ids"].numpy()) for a, b in zip(out, again))


def test_reorder_by_importance_keeps_full_width_output(tiny_bert, batches):
    distiller = supernet.WidthDistiller(tiny_bert, 0.1, 1.0)
    ofa_model = distiller.ofa_model
    ofa_model.model.eval()
    before = [logits_at(ofa_model, 1.0, b) for b in batches]
    layers = ofa_model.model.bert.encoder.layers
    q_before = [layer.self_attn.q_proj.fn.weight.numpy().copy() for layer in layers]
    ffn_before = [layer.linear1.fn.weight.numpy().copy() for layer in layers]
    teacher_q = [layer.self_attn.q_proj.weight.numpy().copy() for layer in distiller.teacher.bert.encoder.layers]

    head_imp, neuron_imp = supernet.reorder_by_importance(ofa_model.model, batches)

    after = [logits_at(ofa_model, 1.0, b) for b in batches]
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, atol=1e-5)
    head_imp = np.asarray(head_imp.numpy() if isinstance(head_imp, paddle.Tensor) else head_imp)
    assert head_imp.shape == (2, 4)
    changed, heads_moved = False, []
    for i, layer in enumerate(layers):
        # heads: q_proj output columns moved as whole heads, most important first
        heads = block_permutation(layer.self_attn.q_proj.fn.weight.numpy(), q_before[i], 4, axis=1)
        assert heads is not None
        assert heads == list(np.argsort(-head_imp[i], kind="stable"))
        # neurons: linear1 output columns, most important first
        neurons = block_permutation(layer.linear1.fn.weight.numpy(), ffn_before[i], 64, axis=1)
        assert neurons == list(np.argsort(-np.asarray(neuron_imp[i]), kind="stable"))
        changed |= heads != sorted(heads) or neurons != sorted(neurons)
        heads_moved += [i] if heads != sorted(heads) else []
    assert changed, "importance was already sorted everywhere: the reordering did nothing visible"
    # the teacher copy the distiller actually uses is not reordered; a layer whose heads moved shows it
    assert heads_moved, "no layer's heads moved: a teacher sharing the supernet's weights would go unseen"
    for i, layer in enumerate(distiller.teacher.bert.encoder.layers):
        np.testing.assert_array_equal(layer.self_attn.q_proj.weight.numpy(), teacher_q[i])
    # and no gradient is left behind
    assert all(p.grad is None or not np.any(p.grad.numpy()) for p in ofa_model.model.parameters())


def watch_teacher(distiller):
    """Record, at each forward of the distiller's teacher copy, whether it was in training mode."""
    seen = []
    distiller.teacher.register_forward_pre_hook(lambda layer, inputs: seen.append(layer.training))
    return seen


def test_distill_step_runs_the_teacher_once_in_eval_mode_without_gradients(tiny_bert, batches):
    distiller = supernet.WidthDistiller(tiny_bert, 0.1, 1.0)
    distiller.student.train()  # as train_loop leaves it: dropout on in the student only
    seen = watch_teacher(distiller)
    losses = distiller.step(batches[0], [1.0, 0.75, 0.5])
    assert seen == [False]  # one teacher forward for three widths, dropout off
    assert set(losses) == {f"w{w}_{k}" for w in (1.0, 0.75, 0.5) for k in ("loss", "logit", "hidden")}
    grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
    assert grads and any(np.any(g.numpy()) for g in grads)  # backward ran on the student
    assert all(p.grad is None for p in distiller.teacher.parameters())  # not on the copy it distils from
    assert all(p.grad is None for p in tiny_bert.parameters())


def test_distill_step_hidden_loss(tiny_bert, batches):
    distiller = supernet.WidthDistiller(tiny_bert, 0.1, 1.0)
    distiller.student.eval()  # no dropout: at full width the student is the teacher
    losses = distiller.step(batches[0], [1.0, 0.5])
    assert losses["w1.0_hidden"] < 1e-8
    assert losses["w0.5_hidden"] > 0 and losses["w0.5_hidden"] > 100 * max(losses["w1.0_hidden"], 1e-12)
    assert np.isfinite([losses["w1.0_logit"], losses["w0.5_logit"]]).all() and losses["w0.5_logit"] > 0


def test_distill_step_hidden_loss_ignores_special_and_padding_positions(tiny_bert, batches):
    distiller = supernet.WidthDistiller(tiny_bert, 0.1, 1.0)
    distiller.student.eval()
    batch = batches[0]
    reference = distiller.step(batch, [0.5])["w0.5_hidden"]
    # the same batch with two more padding columns: a mask over real characters sees no change
    def pad(tensor, fill):
        return paddle.concat([tensor, paddle.full([tensor.shape[0], 2], fill, dtype=tensor.dtype)], axis=1)
    padded = {"input_ids": pad(batch["input_ids"], 0), "token_type_ids": pad(batch["token_type_ids"], 0),
              "labels": pad(batch["labels"], -100)}
    assert distiller.step(padded, [0.5])["w0.5_hidden"] == pytest.approx(reference, rel=1e-4)


def test_distill_step_logit_loss_is_mean_soft_cross_entropy(tiny_bert, batches):
    distiller = supernet.WidthDistiller(tiny_bert, 0.1, 1.0)
    distiller.student.eval()
    batch = batches[0]
    student = logits_at(distiller.ofa_model, 0.5, batch)
    with paddle.no_grad():
        teacher = tiny_bert(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).numpy()
    labels = batch["labels"].numpy()
    p_t = np.exp(teacher - teacher.max(-1, keepdims=True))
    p_t /= p_t.sum(-1, keepdims=True)
    log_p_s = student - student.max(-1, keepdims=True)
    log_p_s -= np.log(np.exp(log_p_s).sum(-1, keepdims=True))
    per_token = -(p_t * log_p_s).sum(-1)
    expected = per_token[labels != -100].mean()
    losses = distiller.step(batch, [0.5])
    assert losses["w0.5_logit"] == pytest.approx(float(expected), rel=1e-4)


def test_distill_step_in_train_mode_has_positive_hidden_loss(tiny_bert, batches):
    distiller = supernet.WidthDistiller(tiny_bert, 0.1, 1.0)
    distiller.student.train()
    losses = distiller.step(batches[1], [0.5])
    assert losses["w0.5_hidden"] > 0


def _pruned_from_supernet(tiny_bert, batches, width):
    ofa_model = supernet.WidthDistiller(tiny_bert, 0.1, 1.0).ofa_model
    ofa_model.model.eval()
    supernet.reorder_by_importance(ofa_model.model, batches)
    config = copy.deepcopy(tiny_bert.config)
    config.width_mult = width
    sub = families.PrunedBertForTokenClassification(config)
    sub.set_state_dict(modeling.sub_model_state(ofa_model.model.state_dict(), sub))
    sub.eval()
    return ofa_model, sub


def _logits(model, batch):
    with paddle.no_grad():
        return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).numpy()


def test_pruned_sub_model_equals_supernet_at_half_width(tiny_bert, batches):
    ofa_model, sub = _pruned_from_supernet(tiny_bert, batches, 0.5)
    attn = sub.bert.encoder.layers[0].self_attn
    assert attn.num_heads == 2 and list(attn.q_proj.weight.shape) == [32, 16]
    assert list(sub.bert.encoder.layers[0].linear1.weight.shape) == [32, 32]
    assert modeling.count_parameters(sub) < modeling.count_parameters(tiny_bert)
    for batch in batches:
        half = logits_at(ofa_model, 0.5, batch)
        np.testing.assert_allclose(_logits(sub, batch), half, atol=1e-5)
        assert np.abs(half - logits_at(ofa_model, 1.0, batch)).max() > 1e-4  # width 0.5 is really narrower


def test_sub_model_state_refuses_a_foreign_state(tiny_bert):
    from ner_compress.core.errors import UserError

    config = copy.deepcopy(tiny_bert.config)
    config.width_mult = 0.5
    sub = families.PrunedBertForTokenClassification(config)
    state = {k: v for k, v in tiny_bert.state_dict().items()}
    state["bert.extra.weight"] = np.zeros([2], "float32")
    with pytest.raises(UserError, match="bert.extra.weight"):
        modeling.sub_model_state(state, sub)
    state.pop("bert.extra.weight")
    state.pop("classifier.bias")
    with pytest.raises(UserError, match="lack"):
        modeling.sub_model_state(state, sub)


@pytest.mark.parametrize("safe", [False, True])
def test_pruned_model_save_and_reload(tiny_bert, batches, tmp_path, safe):
    _, sub = _pruned_from_supernet(tiny_bert, batches, 0.5)
    sub.save_pretrained(str(tmp_path), safe_serialization=safe)
    if safe:
        assert (tmp_path / modeling.SAFE_WEIGHTS).is_file()
        reloaded = modeling.load_pretrained(families.PrunedBertForTokenClassification, str(tmp_path))
    else:
        reloaded = families.PrunedBertForTokenClassification.from_pretrained(str(tmp_path))
    reloaded.eval()
    assert reloaded.config.layer_heads == [2, 2] and reloaded.config.layer_neurons == [32, 32]
    assert not hasattr(reloaded.config, "width_mult")  # the config given the previous format is saved in the new
    assert reloaded.bert.encoder.layers[1].self_attn.num_heads == 2
    assert list(reloaded.bert.encoder.layers[1].linear2.weight.shape) == [32, 32]
    for batch in batches:
        np.testing.assert_array_equal(_logits(reloaded, batch), _logits(sub, batch))


def test_build_teacher_from_saved_directory(tiny_bert, batches, tmp_path):
    tiny_bert.save_pretrained(str(tmp_path), safe_serialization=True)
    assert (tmp_path / modeling.SAFE_WEIGHTS).is_file()
    teacher = modeling.build_teacher(Config(model_name_or_path=str(tmp_path)), LABELS, 21128, 0)
    teacher.eval()
    assert teacher.config.id2label == dict(enumerate(LABELS))
    for batch in batches:
        np.testing.assert_array_equal(_logits(teacher, batch), _logits(tiny_bert, batch))


def test_build_teacher_pickled_weights_need_allow_pickle(tiny_bert, batches, tmp_path):
    from ner_compress.core.errors import UserError

    tiny_bert.save_pretrained(str(tmp_path))  # model_state.pdparams (pickle)
    assert (tmp_path / modeling.PICKLED_WEIGHTS).is_file() and not (tmp_path / modeling.SAFE_WEIGHTS).exists()
    with pytest.raises(UserError, match="allow_pickle") as err:
        modeling.build_teacher(Config(model_name_or_path=str(tmp_path)), LABELS, 21128, 0)
    assert str(tmp_path) in str(err.value)
    teacher = modeling.build_teacher(Config(model_name_or_path=str(tmp_path), allow_pickle=True), LABELS, 21128, 0)
    teacher.eval()
    np.testing.assert_array_equal(_logits(teacher, batches[0]), _logits(tiny_bert, batches[0]))


def test_build_teacher_refuses_directory_without_weights(tmp_path):
    from ner_compress.core.errors import UserError

    with pytest.raises(UserError, match=str(tmp_path)):
        modeling.build_teacher(Config(model_name_or_path=str(tmp_path)), LABELS, 21128, 0)


def test_build_teacher_refuses_other_vocab_size(tiny_bert, tmp_path):
    from ner_compress.core.errors import UserError

    tiny_bert.save_pretrained(str(tmp_path), safe_serialization=True)
    with pytest.raises(UserError, match="vocab size"):
        modeling.build_teacher(Config(model_name_or_path=str(tmp_path)), LABELS, 30000, 0)


def test_build_teacher_fresh_from_config():
    cfg = Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    teacher = modeling.build_teacher(cfg, LABELS, 21128, 0)
    assert teacher.config.num_labels == 7 and teacher.config.hidden_size == 32
    assert len(teacher.bert.encoder.layers) == 2
    assert list(teacher.classifier.weight.shape) == [32, 7]


def test_pre_layer_norm_teacher_is_its_own_full_width_supernet_and_reloads(tmp_path):
    cfg = Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 normalize_before=True)
    paddle.seed(5)
    teacher = modeling.build_teacher(cfg, LABELS, 21128, 0)
    teacher.eval()
    assert all(layer.normalize_before for layer in teacher.bert.encoder.layers)
    assert teacher.bert.encoder.norm is not None
    ofa_model = supernet.WidthDistiller(teacher, 0.1, 1.0).ofa_model
    ofa_model.model.eval()
    ids = paddle.to_tensor(np.random.RandomState(0).randint(106, 8000, size=(2, 11)), dtype="int64")
    batch = {"input_ids": ids, "token_type_ids": paddle.zeros_like(ids)}
    np.testing.assert_allclose(logits_at(ofa_model, 1.0, batch), _logits(teacher, batch), atol=1e-5)
    teacher.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = modeling.load_pretrained(families.PrunedBertForTokenClassification, str(tmp_path))
    reloaded.eval()
    np.testing.assert_array_equal(_logits(reloaded, batch), _logits(teacher, batch))
    # pre-LN: the first LayerNorm runs before attention (post-LN: after it)
    for model, expected in ((teacher, ["norm1", "self_attn"]), (modeling.build_teacher(
            Config(**{**cfg.to_dict(), "normalize_before": False}), LABELS, 21128, 0), ["self_attn", "norm1"])):
        calls, layer = [], model.bert.encoder.layers[0]
        handles = [getattr(layer, n).register_forward_pre_hook(lambda *_, n=n: calls.append(n))
                   for n in ("norm1", "self_attn")]
        _logits(model, batch)
        assert calls == expected
        for h in handles:
            h.remove()


def test_local_context_teacher_is_its_own_full_width_supernet_and_ignores_padding(tmp_path):
    cfg = Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 local_conv_kernel=3)
    paddle.seed(6)
    teacher = modeling.build_teacher(cfg, LABELS, 21128, 0)
    teacher.eval()
    assert isinstance(teacher.bert.embeddings.local_conv, paddle.nn.Conv1D)
    ids = paddle.to_tensor(np.random.RandomState(1).randint(106, 8000, size=(2, 11)), dtype="int64")
    batch = {"input_ids": ids, "token_type_ids": paddle.zeros_like(ids)}
    without = modeling.build_teacher(Config(**{**cfg.to_dict(), "local_conv_kernel": 0}), LABELS, 21128, 0)
    without.set_state_dict(teacher.state_dict())
    without.eval()
    assert np.abs(_logits(without, batch) - _logits(teacher, batch)).max() > 1e-3  # the convolution is used
    ofa_model = supernet.WidthDistiller(teacher, 0.1, 1.0).ofa_model
    ofa_model.model.eval()
    np.testing.assert_allclose(logits_at(ofa_model, 1.0, batch), _logits(teacher, batch), atol=1e-5)
    padded = paddle.concat([ids, paddle.zeros([2, 5], dtype="int64")], axis=1)
    np.testing.assert_allclose(_logits(teacher, {"input_ids": padded, "token_type_ids": paddle.zeros_like(padded)})
                               [:, :11], _logits(teacher, batch), atol=1e-5)
    teacher.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = modeling.load_pretrained(families.PrunedBertForTokenClassification, str(tmp_path))
    reloaded.eval()
    np.testing.assert_array_equal(_logits(reloaded, batch), _logits(teacher, batch))


def test_local_context_takes_vectors_where_a_caller_gives_no_ids():
    cfg = Config(model_type="ernie", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                 local_conv_kernel=3)
    paddle.seed(8)
    embeddings = modeling.build_teacher(cfg, LABELS, 21128, 0).base_model.embeddings
    embeddings.eval()
    ids = paddle.to_tensor(np.random.RandomState(2).randint(106, 8000, size=(2, 9)), dtype="int64")
    by_ids = embeddings(input_ids=ids)
    by_vectors = embeddings(inputs_embeds=embeddings.word_embeddings(ids))
    np.testing.assert_allclose(by_vectors.numpy(), by_ids.numpy(), atol=1e-6)


def test_label_smoothing_loss_equals_its_definition():
    from ner_compress.compress.training import token_loss_sum

    rng = np.random.RandomState(4)
    logits = paddle.to_tensor(rng.randn(2, 5, 7).astype("float32"))
    labels = paddle.to_tensor([[-100, 1, 0, 6, -100], [-100, 2, -100, -100, -100]], dtype="int64")
    log_p = logits.numpy() - np.log(np.exp(logits.numpy()).sum(-1, keepdims=True))
    keep = labels.numpy() != -100
    gold = np.take_along_axis(log_p, np.maximum(labels.numpy(), 0)[..., None], -1)[..., 0]
    nll, uniform = -gold[keep].sum(), -log_p.mean(-1)[keep].sum()
    assert float(token_loss_sum(logits, labels)) == pytest.approx(nll, rel=1e-5)
    assert float(token_loss_sum(logits, labels, 0.1)) == pytest.approx(0.9 * nll + 0.1 * uniform, rel=1e-5)
