"""Layer-wise reconstruction: refit a cut model's output projections so each layer reproduces its teacher layer.

The field calls it mask tuning (Kwon et al. 2022) or layer-wise reconstruction. After a cut (fewer heads and
FFN neurons) or a shallower student, every encoder layer's attention output projection (its input: the kept
heads' context) and second FFN linear (its input: the kept neurons' activations) are refit, weights and bias,
by ridge least squares in float64, to give the teacher layer's output of the same projection for the same
tokens. Bottom layer first, on the cut model's own inputs, so each layer also absorbs what the layers below
it lost. Calibration sentences come from the training split; a share of them is held out to choose the
ridge and to check the refit: a refit that does not lower the held-out error is not applied.
"""
from dataclasses import asdict, dataclass

import numpy as np
import paddle

from ner_compress.data.corpus import collate
from ner_compress.models.encoder_changes import encoder_layers

# what is refit in each encoder layer: record name -> sublayer path
PROJECTIONS = {"attention_output": "self_attn.out_proj", "ffn_output": "linear2"}
# post-LN: the LayerNorm right after each projection's residual add (its input: stream + projection output)
RESIDUAL_NORMS = {"attention_output": "norm1", "ffn_output": "norm2"}
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)  # x trace(input covariance) / input width
HELD_OUT_SHARE = 0.25


@dataclass
class Calibration:
    """Collated calibration batches; ``held_out[k]``: batch k only scores fits, never makes one."""
    batches: list
    held_out: list
    pad_id: int
    sentences: int

    def real_tokens(self, k):
        """[batch, length] bool: every position but padding ([CLS] and [SEP] included)."""
        return self.batches[k]["input_ids"] != self.pad_id


def calibration_set(windows, count, batch_size, pad_id, seed):
    """``count`` windows drawn at random (seeded); the last quarter held out. Each part is sorted by length
    before batching, so little is padded."""
    order = np.random.RandomState(seed).permutation(len(windows))[:count]
    held = max(1, int(round(len(order) * HELD_OUT_SHARE))) if len(order) > 1 else 0
    batches, flags = [], []
    for part, is_held in ((order[: len(order) - held], False), (order[len(order) - held:], True)):
        part = sorted(part, key=lambda i: len(windows[i].input_ids))
        for j in range(0, len(part), batch_size):
            batches.append(collate([windows[i] for i in part[j: j + batch_size]], pad_id))
            flags.append(is_held)
    return Calibration(batches, flags, pad_id, len(order))


class _StopForward(Exception):
    pass


def projection(layer, name):
    """The ``nn.Linear`` a ``PROJECTIONS`` name stands for in an encoder layer."""
    for part in PROJECTIONS[name].split("."):
        layer = getattr(layer, part)
    return layer


def _ids(batch):
    return {name: paddle.to_tensor(batch[name]) for name in ("input_ids", "token_type_ids")}


def first_layer_calls(model, calibration):
    """The (args, kwargs) each batch reaches the first encoder layer with: embeddings and attention mask
    exactly as the model's own forward makes them."""
    first = encoder_layers(model)[0]
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise _StopForward

    object.__setattr__(first, "forward", record)
    try:
        with paddle.no_grad():
            for batch in calibration.batches:
                try:
                    model(**_ids(batch))
                except _StopForward:
                    pass
    finally:
        first.__dict__.pop("forward", None)
    return calls


def _rows(tensor, mask):
    return tensor.numpy().reshape(-1, tensor.shape[-1])[mask.reshape(-1)]


def _split(calibration, per_batch):
    """Rows of the fitting batches and of the held-out batches, each stacked."""
    fit = [r for r, held in zip(per_batch, calibration.held_out) if not held]
    held = [r for r, held in zip(per_batch, calibration.held_out) if held]
    return np.concatenate(fit), (np.concatenate(held) if held else None)


def record_rows(calibration, taps, run_batch):
    """``run_batch(k)`` for every calibration batch k, recording the real-token rows of each tap:
    ``taps[key] = (sublayer, "input" | "output")``. Returns {key: (fitting rows, held-out rows)}."""
    rows = {key: [] for key in taps}
    current = {"batch": 0}

    def hook(key, sublayer, side):
        def keep(tensor):
            rows[key].append(_rows(tensor, calibration.real_tokens(current["batch"])))
        if side == "input":
            return sublayer.register_forward_pre_hook(lambda layer, inputs: keep(inputs[0]))
        return sublayer.register_forward_post_hook(lambda layer, inputs, output: keep(output))

    handles = [hook(key, *tap) for key, tap in taps.items()]
    try:
        with paddle.no_grad():
            for k in range(len(calibration.batches)):
                current["batch"] = k
                run_batch(k)
    finally:
        for handle in handles:
            handle.remove()
    return {key: _split(calibration, r) for key, r in rows.items()}


def taps(layer, name, residual):
    """What to record around a layer's projection: its input and output, and (residual targets) the input
    of the LayerNorm after the residual add, i.e. residual stream + projection output (post-LN layers)."""
    found = {"input": (projection(layer, name), "input"), "output": (projection(layer, name), "output")}
    if residual:
        found["sum"] = (getattr(layer, RESIDUAL_NORMS[name]), "input")
    return found


def teacher_targets(teacher, calibration, teacher_layers, residual):
    """{teacher layer: {projection: recorded rows}}, one forward of the teacher per batch."""
    layers = encoder_layers(teacher)
    wanted = {(j, name, what): tap for j in sorted(set(teacher_layers)) for name in PROJECTIONS
              for what, tap in taps(layers[j], name, residual).items() if what != "input"}
    recorded = record_rows(calibration, wanted, lambda k: teacher(**_ids(calibration.batches[k])))
    return {j: {name: {what: recorded[(j, name, what)] for what in ("output", "sum") if (j, name, what) in recorded}
                for name in PROJECTIONS} for j in set(teacher_layers)}


def run_layer(layer, calls):
    """``layer`` on each recorded call; the outputs' calls for the next layer."""
    out = []
    with paddle.no_grad():
        for args, kwargs in calls:
            result = layer(*args, **kwargs)
            hidden = result[0] if isinstance(result, (tuple, list)) else result
            out.append(((hidden, *args[1:]), kwargs))
    return out


def inputs_and_targets(layer, name, calls, calibration, teacher_rows, residual):
    """The projection's input rows and what its output should be: the teacher's projection output, or
    (residual) whatever makes the student's residual sum equal the teacher's: teacher sum - student sum +
    student output. Each as (fitting rows, held-out rows)."""
    recorded = record_rows(calibration, taps(layer, name, residual),
                           lambda k: layer(*calls[k][0], **calls[k][1]))
    if not residual:
        return recorded["input"], teacher_rows["output"]
    targets = tuple(None if t is None else t - s + o for t, s, o in
                    zip(teacher_rows["sum"], recorded["sum"], recorded["output"]))
    return recorded["input"], targets


def ridge_solutions(x, y, alphas):
    """Weights [in, out] and bias minimising |xW + b - y|^2 + lam |W|^2 (bias not penalised) for each of
    ``alphas``, in float64; lam = alpha x trace(centred input covariance) / input width. The Gram matrix, most
    of the cost, is made once for all of them."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc = x - mean_x
    gram, cross = xc.T @ xc, xc.T @ (y - mean_y)
    unit = np.trace(gram) / x.shape[1] * np.eye(x.shape[1])
    solutions = []
    for alpha in alphas:
        w = np.linalg.solve(gram + alpha * unit, cross)
        solutions.append((w, mean_y - mean_x @ w))
    return solutions


def ridge_solution(x, y, alpha):
    return ridge_solutions(x, y, [alpha])[0]


def relative_error(x, y, w, b):
    """|xW + b - y| / |y| (Frobenius), in float64."""
    pred = x.astype(np.float64) @ w + b
    return float(np.linalg.norm(pred - y) / max(np.linalg.norm(y), 1e-12))


@dataclass
class Refit:
    """What the refit of one projection did (a manifest record): the errors of the weights it ends with."""
    alpha: float
    fit_error_before: float
    fit_error_after: float
    held_out_error_before: float
    held_out_error_after: float
    applied: bool


def refit_projection(linear, inputs, targets, ridge_grid=RIDGE_GRID):
    """Choose the ridge on held-out rows, refit on all rows, and set ``linear``'s weights if that lowers
    the held-out error (else leave them)."""
    (x_fit, x_held), (y_fit, y_held) = inputs, targets
    if x_held is None:  # one calibration batch: nothing to choose on, so the smallest ridge
        x_held, y_held, ridge_grid = x_fit, y_fit, ridge_grid[:1]
    current = (linear.weight.numpy().astype(np.float64), linear.bias.numpy().astype(np.float64))
    fit_before, held_before = relative_error(x_fit, y_fit, *current), relative_error(x_held, y_held, *current)
    held_after, alpha = min((relative_error(x_held, y_held, *fit), a)
                            for fit, a in zip(ridge_solutions(x_fit, y_fit, ridge_grid), ridge_grid))
    if held_after >= held_before:
        return Refit(alpha, fit_before, fit_before, held_before, held_before, False)
    w, b = ridge_solution(np.concatenate([x_fit, x_held]), np.concatenate([y_fit, y_held]), alpha)
    linear.weight.set_value(w.astype(np.float32))
    linear.bias.set_value(b.astype(np.float32))
    return Refit(alpha, fit_before, relative_error(x_fit, y_fit, w, b), held_before,
                 relative_error(x_held, y_held, w, b), True)


def reconstruct(model, teacher, calibration, teacher_layers, target="projection", targets_cache=None):
    """Refit every encoder layer of ``model`` (eval mode, in place) against ``teacher_layers[i]`` of
    ``teacher``; one record per layer, bottom first. ``target``: ``projection`` (the teacher projection's
    output) or ``residual`` (the teacher's residual sum: also makes up for layers a student skips and for
    the errors of the layers below; post-LN layers only). ``targets_cache``: a dict kept across refits of
    several models against one teacher and calibration, so the teacher runs once."""
    model.eval()
    teacher.eval()
    residual = target == "residual"
    if residual and any(getattr(layer, "normalize_before", False) for layer in encoder_layers(model)):
        residual = False  # pre-LN: no LayerNorm right after the residual add to read the sum from
    cache = {} if targets_cache is None else targets_cache
    key = (tuple(sorted(set(teacher_layers))), residual)
    if key not in cache:
        cache[key] = teacher_targets(teacher, calibration, teacher_layers, residual)
    teacher_rows = cache[key]
    calls = first_layer_calls(model, calibration)
    records = []
    for i, layer in enumerate(encoder_layers(model)):
        record = {"layer": i, "teacher_layer": int(teacher_layers[i])}
        for name in PROJECTIONS:
            inputs, targets = inputs_and_targets(layer, name, calls, calibration,
                                                 teacher_rows[teacher_layers[i]][name], residual)
            record[name] = asdict(refit_projection(projection(layer, name), inputs, targets))
        records.append(record)
        calls = run_layer(layer, calls)
    return records
