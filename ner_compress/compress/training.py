"""Teacher fine-tuning, and the training loop both stages share.

The loop: AdamW with linear warm-up and decay, global-norm clipping, dev evaluation every
``eval_steps``, checkpoints every ``save_steps``, at each epoch end and on SIGINT/SIGTERM,
resumable with ``--resume``; several processes each read their shard of every global batch.
"""
import hashlib
import logging
import math
import random
import sys
import time
from functools import partial

import numpy as np
import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import LinearDecayWithWarmup
from tqdm import tqdm

from ner_compress.core import parallel, runtime
from ner_compress.models.families import save_tokenizer
from ner_compress.core.artifacts import atomic_dir, write_manifest
from ner_compress.core.checkpoint import Checkpointer, resume_path, stop_on_signals
from ner_compress.core.errors import StopRequested
from ner_compress.data.corpus import IGNORE_INDEX, collate, train_batches
from ner_compress.data.decoding import Decoder
from ner_compress.data.window_scores import sentence_log_probs
from ner_compress.core.errors import UserError
from ner_compress.data.entity_scores import entity_scores
from ner_compress.models.modeling import build_teacher, count_parameters, numpy_logits

log = logging.getLogger("ner_compress")
_PROGRESS = {"bars": True}


def hide_progress_bars():
    """This process logs progress lines only (stages running side by side share one terminal)."""
    _PROGRESS["bars"] = False


def setup_logging(level=logging.INFO):
    """Our progress lines on stderr (rank 0 only); PaddleNLP's per-file notices only at WARNING."""
    from paddlenlp.utils.log import logger as paddlenlp_logger

    paddlenlp_logger.set_level("WARNING")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level if parallel.is_writer() else logging.WARNING)
    log.propagate = False


def set_device(device):
    if device == "gpu" and not paddle.device.is_compiled_with_cuda():
        raise UserError("--device gpu: this paddlepaddle has no CUDA; install paddlepaddle-gpu==2.6.2 or use cpu")
    paddle.set_device(f"gpu:{paddle.distributed.ParallelEnv().dev_id}" if device == "gpu" else "cpu")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def to_tensors(batch):
    return {k: paddle.to_tensor(v) for k, v in batch.items()}


def token_loss(logits, labels):
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def token_loss_sum(logits, labels, label_smoothing=0.0):
    """Cross-entropy summed over real characters; with smoothing e the target puts 1 - e on the gold
    label and e evenly on all (Paddle 2.6's own ``label_smoothing`` one-hots -100 and fails)."""
    nll = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if not label_smoothing:
        return nll
    mask = (labels != IGNORE_INDEX).astype(logits.dtype)
    uniform = -(F.log_softmax(logits, axis=-1).mean(-1) * mask).sum()
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def global_token_count(labels):
    """Real characters in this step's global batch (all ranks), so every rank's loss is a share
    of one global mean and summed gradients equal a single process with the whole batch."""
    return max(parallel.all_reduce_sum(int((labels != IGNORE_INDEX).astype("int64").sum())), 1.0)


def make_optimizer(parameters, named_parameters, learning_rate, weight_decay, warmup_ratio, total_steps):
    """AdamW with linear warm-up then linear decay; no weight decay on biases and norms."""
    scheduler = LinearDecayWithWarmup(learning_rate, total_steps, warmup_ratio)
    decay = {p.name for n, p in named_parameters if not any(k in n for k in ("bias", "norm"))}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler, parameters=parameters, weight_decay=weight_decay,
        apply_decay_param_fun=lambda name: name in decay, grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    return optimizer, scheduler


def total_steps(max_steps, epochs, steps_per_epoch):
    if steps_per_epoch == 0:
        raise UserError("no training batches: the training split is empty or smaller than one global batch")
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))


def epoch_batches(windows, batch_size, seed, epoch):
    lengths = [len(w.input_ids) for w in windows]
    return train_batches(lengths, batch_size, seed, epoch, parallel.rank(), parallel.world_size())


def count_batches(windows, batch_size):
    return len(epoch_batches(windows, batch_size, 0, 0))


def iterate_steps(windows, batch_size, seed, steps, pad_id, start=0):
    """Yield (epoch, last step of its epoch?, collated batch) for steps ``start+1 .. steps``.

    Batches are a pure function of (seed, epoch), so resuming at ``start`` skips without work.
    """
    done, epoch = 0, 0
    while done < steps:
        batches = epoch_batches(windows, batch_size, seed, epoch)
        for i, idx in enumerate(batches):
            if done == steps:
                return
            done += 1
            if done > start:
                yield epoch, i == len(batches) - 1, collate([windows[j] for j in idx], pad_id)
        epoch += 1


def evaluate(logits_fn, data, windows, batch_size, decoding="viterbi"):
    """Entity scores on dev, decoded exactly as ``predict.py`` decodes (same windows, pad id, decoder)."""
    sentences = data.splits.dev
    scores = sentence_log_probs(logits_fn, sentences, windows, batch_size, data.encoder.pad_id)
    decoder = Decoder(data.labels, decoding)
    return {**entity_scores([s.tags for s in sentences], [decoder(s) for s in scores]),
            "loss": gold_nll(scores, sentences, data.label_to_id)}


def gold_nll(scores, sentences, label_to_id):
    """Mean negative log-likelihood of the gold tags per character (the dev loss)."""
    total = sum(-float(s[np.arange(len(sent.tags)), [label_to_id[t] for t in sent.tags]].sum())
                for s, sent in zip(scores, sentences))
    return total / max(sum(len(sent.tags) for sent in sentences), 1)


def train_loop(name, cfg, model, optimizer, scheduler, windows, steps, eval_steps, step_fn, eval_fn, checkpointer,
               pad_id):
    """Run ``step_fn(batch) -> {loss name: float}`` for ``steps`` steps, resuming if asked.

    ``eval_fn(step, state)`` evaluates on dev and records the best in ``state``. Returns ``state``
    (``best``, ``history``, ``step``). Raises ``StopRequested`` after saving on SIGINT/SIGTERM.
    """
    state = {"step": 0, "best": {}, "history": []}
    resume = resume_path(cfg, checkpointer)
    if resume:
        state = checkpointer.load(resume, model, optimizer)
    parallel.broadcast_parameters(model)
    bar = tqdm(total=steps, initial=state["step"], desc=name, mininterval=2, dynamic_ncols=True,
               disable=not (parallel.is_writer() and _PROGRESS["bars"]))
    model.train()
    timer = {"start": time.perf_counter(), "sentences": 0, "steps": 0}
    with stop_on_signals() as stop:
        batches = iterate_steps(windows, cfg.per_device_train_batch_size, cfg.seed, steps, pad_id, state["step"])
        for step, (epoch, epoch_end, batch) in enumerate(batches, state["step"] + 1):
            paddle.seed(cfg.seed + step)  # dropout depends on the step alone: resumable exactly
            losses = step_fn(to_tensors(batch))
            parallel.all_reduce_gradients(model.parameters())
            optimizer.step()
            scheduler.step()
            optimizer.clear_grad()
            state["step"] = step
            timer["sentences"] += len(batch["input_ids"]) * parallel.world_size()
            timer["steps"] += 1
            state["speed"] = training_speed(timer)
            state["history"].append({"step": step, **losses})
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in list(losses.items())[:2]})
            if step % cfg.logging_steps == 0:
                log.info("%s step %d/%d epoch %d lr %.2e %s, %.1f sentences/s", name, step, steps, epoch,
                         optimizer.get_lr(), " ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                         state["speed"]["train_sentences_per_s"])
            if step % eval_steps == 0 or step == steps:
                model.eval()
                eval_fn(step, state)
                model.train()
            if step % cfg.save_steps == 0 or epoch_end or step == steps or stop["signum"]:
                path = checkpointer.save(step, model, optimizer, state)
                parallel.barrier()
                if stop["signum"]:
                    raise StopRequested(stop["signum"], step, path)
    bar.close()
    print(f"{name} rank {parallel.rank()} final parameters sha256 {parameters_digest(model)}", file=sys.stderr)
    return state


def training_speed(timer):
    """Training throughput since this run (or resume) started, evaluation time included."""
    seconds = max(time.perf_counter() - timer["start"], 1e-9)
    return {"train_sentences_per_s": timer["sentences"] / seconds, "train_steps_per_s": timer["steps"] / seconds,
            "train_seconds": seconds}


def parameters_digest(model):
    """One hash of every weight, to show that all ranks ended with the same model."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(param.numpy()).tobytes())
    return digest.hexdigest()


def save_teacher(model, data, cfg, metrics, out_dir, speed=None, stage="teacher", inputs=None, **extra):
    """A loadable model directory; the student stage writes the same format (``stage="student"``)."""
    if not parallel.is_writer():
        return
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(model, data.vocab_file, tmp)
        write_manifest(tmp, stage, cfg.to_dict(), data.labels, data.vocab_sha256, metrics, inputs=inputs,
                       data_sources=data.splits.sources, unknown_characters=data.unknown_characters(),
                       parameters=count_parameters(model),
                       architecture=model.config.model_type, runtime=runtime.report(), speed=speed or {}, **extra)


def best_model_eval(name, model, data, dev_windows, cfg, save):
    """``eval_fn`` for ``train_loop`` with one model: dev F1, and ``save(state)`` at each new best."""
    def eval_fn(step, state):
        # every rank scores the whole dev set with identical weights: one F1, one decision
        scores = evaluate(partial(numpy_logits, model), data, dev_windows, cfg.per_device_eval_batch_size,
                          cfg.decoding)
        log.info("%s step %d dev P %.4f R %.4f F1 %.4f", name, step, scores["precision"], scores["recall"],
                 scores["f1"])
        if scores["f1"] > state["best"].get("dev_f1", -1.0):
            state["best"] = {"dev_f1": scores["f1"], "dev": scores, "step": step}
            save(state)
    return eval_fn


def train_teacher(cfg, data, out_dir, checkpoint_root):
    """Fine-tune the teacher; the best dev-F1 model is (re)written to ``out_dir`` as it appears."""
    set_seed(cfg.seed)
    model = build_teacher(cfg, data.labels, len(data.encoder.vocab), data.encoder.pad_id)
    train_w, dev_w = data.windows("train"), data.windows("dev")
    steps_per_epoch = count_batches(train_w, cfg.per_device_train_batch_size)
    steps = total_steps(cfg.max_steps, cfg.num_train_epochs, steps_per_epoch)
    optimizer, scheduler = make_optimizer(model.parameters(), model.named_parameters(), cfg.learning_rate,
                                          cfg.weight_decay, cfg.warmup_ratio, steps)
    log.info("teacher: %d parameters, %d train windows, %d steps (%.2f epochs), %d process(es)",
             count_parameters(model), len(train_w), steps, steps / steps_per_epoch, parallel.world_size())

    def step_fn(batch):
        logits = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        loss_sum = token_loss_sum(logits, batch["labels"], cfg.label_smoothing)
        tokens = global_token_count(batch["labels"])
        (loss_sum / tokens).backward()
        return {"loss": parallel.all_reduce_sum(float(loss_sum)) / tokens}

    eval_fn = best_model_eval("teacher", model, data, dev_w, cfg,
                              lambda state: save_teacher(model, data, cfg, state["best"], out_dir, state.get("speed")))
    checkpointer = Checkpointer(checkpoint_root, cfg.save_total_limit, writer=parallel.is_writer())
    state = train_loop("teacher", cfg, model, optimizer, scheduler, train_w, steps, cfg.eval_steps, step_fn,
                       eval_fn, checkpointer, data.encoder.pad_id)
    log.info("teacher: best dev F1 %.4f at step %d -> %s", state["best"]["dev_f1"], state["best"]["step"], out_dir)
    return state["best"]
