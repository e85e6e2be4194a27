"""Teacher fine-tuning, and the one runner every training stage (teacher, supernets, student) uses.

A stage says what differs (``Stage``); ``run_stage`` does the rest: AdamW with linear warm-up and
decay, global-norm clipping, dev evaluation every ``eval_steps``, checkpoints every ``save_steps``,
at each epoch end and on SIGINT/SIGTERM, resumable with ``--resume``; several processes each read
their shard of every global batch.
"""
import copy
import hashlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np
import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import LinearDecayWithWarmup
from tqdm import tqdm

from ner_compress.core import parallel, runtime
from ner_compress.models.families import save_tokenizer
from ner_compress.core.artifacts import atomic_dir, model_input, write_manifest
from ner_compress.core.console import detail, verbose
from ner_compress.core.checkpoint import Checkpointer, resume_path, stop_on_signals
from ner_compress.core.options import Schedule
from ner_compress.core.errors import StopRequested
from ner_compress.data.corpus import IGNORE_INDEX, collate, train_batches
from ner_compress.data.decoding import Decoder
from ner_compress.data.window_scores import sentence_log_probs
from ner_compress.core.errors import UserError
from ner_compress.data.entity_scores import entity_scores
from ner_compress.models.e5_pretrained import resolve_model_path
from ner_compress.models.modeling import build_teacher, count_parameters, numpy_logits

log = logging.getLogger("ner_compress")
_PROGRESS = {"bars": True}


def hide_progress_bars():
    """This process logs progress lines only (stages running side by side share one terminal)."""
    _PROGRESS["bars"] = False


def set_device(device):
    if device == "gpu":
        runtime.require_cuda()
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


def make_optimizer(model, learning_rate, cfg, steps):
    """AdamW on every parameter of ``model`` with linear warm-up then linear decay; no weight decay
    on biases and norms."""
    scheduler = LinearDecayWithWarmup(learning_rate, steps, cfg.warmup_ratio)
    decay = {p.name for n, p in model.named_parameters() if not any(k in n for k in ("bias", "norm"))}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler, parameters=model.parameters(), weight_decay=cfg.weight_decay,
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


@dataclass
class Stage:
    """What one training stage says; ``run_stage`` builds and runs the rest the same way for all."""
    name: str  # of log lines, the progress bar and the final digest line
    model: paddle.nn.Layer  # trained whole: every parameter optimised, checkpointed and broadcast
    data: object  # corpus.NerData: trains on its train split
    schedule: Schedule  # learning rate, steps or epochs, evaluation interval: ``cfg.schedule(stage)``
    step_fn: Callable  # step_fn(batch) -> {loss name: float}, gradients accumulated
    eval_fn: Callable  # eval_fn(step, state): scores dev, records the best in state["best"]
    checkpoint_root: str
    before_training: Optional[Callable] = None  # before_training(resuming), before the optimizer is built
    # score the starting weights too, so best-of-dev can keep them: a stage never ends worse than it starts
    # (the teacher's start is a random classifier: nothing to keep)
    evaluate_at_start: bool = True


@dataclass
class Run:
    """What ``run_stage`` built for a stage's loop."""
    windows: list
    steps: int
    optimizer: paddle.optimizer.Optimizer
    scheduler: LinearDecayWithWarmup
    checkpointer: Checkpointer
    resume: Optional[str]  # the checkpoint to continue from, None for a fresh start


def run_stage(cfg, stage):
    """Train windows -> step count -> checkpointer (and the checkpoint to resume) -> AdamW and its
    schedule -> ``train_loop``. Returns the loop's state (``best``, ``history``, ``step``, ``speed``)."""
    windows = stage.data.windows("train")
    steps_per_epoch = count_batches(windows, cfg.per_device_train_batch_size)
    steps = total_steps(stage.schedule.max_steps, stage.schedule.num_train_epochs, steps_per_epoch)
    log.info("%s: %d parameters, %d train windows, %d steps (%.2f epochs), %d process(es)", stage.name,
             count_parameters(stage.model), len(windows), steps, steps / steps_per_epoch, parallel.world_size())
    checkpointer = Checkpointer(stage.checkpoint_root, cfg.save_total_limit, writer=parallel.is_writer())
    resume = resume_path(cfg, checkpointer)
    if stage.before_training:
        stage.before_training(resume is not None)
    optimizer, scheduler = make_optimizer(stage.model, stage.schedule.learning_rate, cfg, steps)
    return train_loop(cfg, stage, Run(windows, steps, optimizer, scheduler, checkpointer, resume))


def train_loop(cfg, stage, run):
    """``stage.step_fn`` for ``run.steps`` steps, from ``run.resume`` if set; ``stage.eval_fn`` every
    ``stage.schedule.eval_steps``. Raises ``StopRequested`` after saving on SIGINT/SIGTERM."""
    model = stage.model
    state = {"step": 0, "best": {}, "history": []}
    if run.resume:
        state = run.checkpointer.load(run.resume, model, run.optimizer)
    parallel.broadcast_parameters(model)
    bar = tqdm(total=run.steps, initial=state["step"], desc=stage.name, mininterval=2, dynamic_ncols=True,
               disable=not (parallel.is_writer() and _PROGRESS["bars"]))
    timer = {"start": time.perf_counter(), "cpu_start": time.process_time(), "sentences": 0, "steps": 0}
    if state["step"] == 0 and stage.evaluate_at_start:
        evaluate_in_eval_mode(stage, 0, state)
    model.train()
    with stop_on_signals() as stop:
        batches = iterate_steps(run.windows, cfg.per_device_train_batch_size, cfg.seed, run.steps,
                                stage.data.encoder.pad_id, state["step"])
        for step, (epoch, epoch_end, batch) in enumerate(batches, state["step"] + 1):
            losses = train_step(cfg, stage, run, step, batch)
            record_step(state, timer, step, losses, len(batch["input_ids"]))
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in list(losses.items())[:2]})
            if step % cfg.logging_steps == 0:
                detail.info("%s step %d/%d epoch %d lr %.2e %s, %.1f sentences/s", stage.name, step, run.steps, epoch,
                         run.optimizer.get_lr(), " ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                         state["speed"]["train_sentences_per_s"])
            if step % stage.schedule.eval_steps == 0 or step == run.steps:
                evaluate_in_eval_mode(stage, step, state)
            if step % cfg.save_steps == 0 or epoch_end or step == run.steps or stop["signum"]:
                path = run.checkpointer.save(step, model, run.optimizer, state)
                parallel.barrier()
                if stop["signum"]:
                    raise StopRequested(stop["signum"], step, path)
    bar.close()
    if parallel.world_size() > 1 or verbose():  # every rank's, to compare (tests/test_distributed.py)
        print(f"{stage.name} rank {parallel.rank()} final parameters sha256 {parameters_digest(model)}",
              file=sys.stderr)
    return state


def evaluate_in_eval_mode(stage, step, state):
    """``stage.eval_fn`` with dropout off; training mode again after."""
    stage.model.eval()
    stage.eval_fn(step, state)
    stage.model.train()


def train_step(cfg, stage, run, step, batch):
    """One optimizer step on ``batch``; dropout depends on the step alone, so resuming is exact."""
    paddle.seed(cfg.seed + step)
    losses = stage.step_fn(to_tensors(batch))
    parallel.all_reduce_gradients(stage.model.parameters())
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.clear_grad()
    return losses


def record_step(state, timer, step, losses, sentences):
    state["step"] = step
    timer["sentences"] += sentences * parallel.world_size()
    timer["steps"] += 1
    state["speed"] = training_speed(timer)
    state["history"].append({"step": step, **losses})


def training_speed(timer):
    """Training throughput since this run (or resume) started, evaluation time included; CPU-seconds are
    this process's on all its threads."""
    seconds = max(time.perf_counter() - timer["start"], 1e-9)
    return {"train_sentences_per_s": timer["sentences"] / seconds, "train_steps_per_s": timer["steps"] / seconds,
            "train_seconds": seconds, "train_cpu_seconds": time.process_time() - timer["cpu_start"]}


def parameters_digest(model):
    """One hash of every weight, to show that all ranks ended with the same model."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(param.numpy()).tobytes())
    return digest.hexdigest()


def frozen_copy(teacher):
    """The teacher a distiller reads: a copy in eval mode without gradients (the caller's model is untouched)."""
    frozen = copy.deepcopy(teacher)
    frozen.eval()
    for p in frozen.parameters():
        p.stop_gradient = True
    return frozen


def save_model_dir(model, data, cfg, metrics, out_dir, stage, speed=None, inputs=None, **extra):
    """A loadable model directory (weights, tokenizer, manifest of ``stage``), written atomically by rank 0."""
    if not parallel.is_writer():
        return
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(model, data.vocab_file, tmp)
        write_manifest(tmp, stage, cfg.to_dict(), data.labels, data.vocab_sha256, metrics, inputs=inputs,
                       data_sources=data.splits.sources, unknown_characters=data.unknown_characters(),
                       parameters=count_parameters(model),
                       architecture=model.config.model_type, runtime=runtime.report(), speed=speed or {}, **extra)


def best_dev_eval(name, model, data, cfg, on_best):
    """``eval_fn`` for a stage with one model: dev scores, and ``on_best(state)`` at each new best (recorded in
    ``state["best"]``)."""
    dev_windows = data.windows("dev")

    def eval_fn(step, state):
        # every rank scores the whole dev set with identical weights: one F1, one decision
        scores = evaluate(partial(numpy_logits, model), data, dev_windows, cfg.per_device_eval_batch_size,
                          cfg.decoding)
        detail.info("%s step %d dev P %.4f R %.4f F1 %.4f", name, step, scores["precision"], scores["recall"],
                    scores["f1"])
        if scores["f1"] > state["best"].get("dev_f1", -1.0):
            state["best"] = {"dev_f1": scores["f1"], "dev": scores, "step": step}
            on_best(state)
    return eval_fn


def best_model_eval(name, model, data, cfg, out_dir, **manifest):
    """``best_dev_eval`` that saves ``model`` to ``out_dir`` (``save_model_dir`` of stage ``name``, ``manifest``
    added) at each new best."""
    return best_dev_eval(name, model, data, cfg, lambda state: save_model_dir(
        model, data, cfg, state["best"], out_dir, name, state.get("speed"), **manifest))


def best_of(name, state, out_dir):
    """The best dev result of a one-model stage, logged."""
    log.info("%s: best dev F1 %.4f at step %d -> %s", name, state["best"]["dev_f1"], state["best"]["step"], out_dir)
    return state["best"]


def starting_model(cfg):
    """The teacher's inputs: the pretrained model it starts from (``artifacts.model_input``; a hub name as
    given), nothing for a fresh model."""
    if not cfg.model_name_or_path:
        return {}
    source = resolve_model_path(cfg.model_name_or_path, cfg.cache_dir)
    return {"model": model_input(source) if os.path.isdir(source) else {"name": source}}


def train_teacher(cfg, data, out_dir, checkpoint_root):
    """Fine-tune the teacher; the best dev-F1 model is (re)written to ``out_dir`` as it appears."""
    set_seed(cfg.seed)
    model = build_teacher(cfg, data.labels, len(data.encoder.vocab), data.encoder.pad_id)
    inputs = starting_model(cfg)  # hashed before training: what it started from, not what it became

    def step_fn(batch):
        logits = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        loss_sum = token_loss_sum(logits, batch["labels"], cfg.label_smoothing)
        tokens = global_token_count(batch["labels"])
        (loss_sum / tokens).backward()
        return {"loss": parallel.all_reduce_sum(float(loss_sum)) / tokens}

    state = run_stage(cfg, Stage(
        name="teacher", model=model, data=data, schedule=cfg.schedule("teacher"), step_fn=step_fn,
        eval_fn=best_model_eval("teacher", model, data, cfg, out_dir, inputs=inputs), checkpoint_root=checkpoint_root,
        evaluate_at_start=False))
    return best_of("teacher", state, out_dir)
