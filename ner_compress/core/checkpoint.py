"""Resumable training: atomic checkpoints without pickle, pruning, and a graceful stop on signals.

A checkpoint is ``<root>/step-NNNNNNNN/`` with ``model.safetensors``, ``optimizer.safetensors``
(+ ``optimizer.json`` for its scalars) and ``trainer_state.json`` (step, best metric, history).
Optimizer moments are stored under the parameters' structured names, so a new process whose
auto-generated parameter names differ still restores them. The data position needs no state:
the batches of an epoch are a pure function of (seed, epoch), and dropout is reseeded from
(seed, step) before every step, so a resumed run replays exactly what an uninterrupted one does.
"""
import json
import logging
import os
import re
import shutil
import signal
from contextlib import contextmanager

import numpy as np
import paddle
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ner_compress.core.artifacts import atomic_dir, write_json
from ner_compress.core.errors import UserError

log = logging.getLogger("ner_compress")
_STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", TRAINER_STATE)


def to_numpy_state(state):
    return {k: (v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)) for k, v in state.items()}


def save_weights(state, path):
    save_file({k: np.ascontiguousarray(v) for k, v in to_numpy_state(state).items()}, path)


def load_weights(path):
    return load_file(path)


def _optimizer_key_map(named_parameters):
    """Optimizer state keys start with the parameter's auto name (``linear_3.w_0``); map them to
    the structured name (``bert.encoder.layers.0.linear1.weight``), longest names first."""
    return sorted(((p.name, n) for n, p in named_parameters), key=lambda item: -len(item[0]))


def split_optimizer_state(state, named_parameters):
    tensors, scalars = {}, {}
    mapping = _optimizer_key_map(named_parameters)
    for key, value in state.items():
        if isinstance(value, paddle.Tensor):
            auto = next(((a, n) for a, n in mapping if key.startswith(a + "_")), None)
            if auto is None:
                raise RuntimeError(f"optimizer state {key} belongs to no parameter")
            tensors[auto[1] + "::" + key[len(auto[0]) + 1:]] = value.numpy()
        else:
            scalars[key] = value
    return tensors, scalars


def join_optimizer_state(tensors, scalars, named_parameters):
    auto_name = {n: p.name for n, p in named_parameters}
    state = dict(scalars)
    for key, value in tensors.items():
        name, suffix = key.split("::", 1)
        if name not in auto_name:
            raise UserError(f"checkpoint optimizer state for {name}: no such parameter in this model")
        state[f"{auto_name[name]}_{suffix}"] = paddle.to_tensor(value)
    return state


class Checkpointer:
    """Writes (on the writer rank only) and finds checkpoints under ``root``; keeps the last ``keep``."""

    def __init__(self, root, keep=2, writer=True):
        self.root, self.keep, self.writer = root, max(1, keep), writer
        self.protected = None  # the checkpoint resumed from is never pruned

    def steps(self):
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            match = _STEP_DIR.match(name)
            if match and os.path.isfile(os.path.join(self.root, name, TRAINER_STATE)):
                found.append(int(match.group(1)))
        return sorted(found)

    def path(self, step):
        return os.path.join(self.root, f"step-{step:08d}")

    def latest(self):
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step, model, optimizer, trainer_state):
        if not self.writer:
            return None
        named = list(model.named_parameters())
        tensors, scalars = split_optimizer_state(optimizer.state_dict(), named)
        with atomic_dir(self.path(step)) as tmp:
            save_weights(model.state_dict(), os.path.join(tmp, "model.safetensors"))
            save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
            write_json(os.path.join(tmp, "optimizer.json"), scalars)
            write_json(os.path.join(tmp, TRAINER_STATE), {**trainer_state, "step": step})
        self.prune()
        return self.path(step)

    def prune(self):
        for step in self.steps()[: -self.keep]:
            path = self.path(step)
            if self.protected and os.path.abspath(path) == os.path.abspath(self.protected):
                continue
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path, model, optimizer):
        """Restore model and optimizer in place; return the trainer state. A checkpoint that is
        incomplete or unreadable is refused: resuming never falls back to a fresh start."""
        check_complete(path)
        try:
            state = self._restore(path, model, optimizer)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            raise UserError(f"--resume_from {path}: unreadable checkpoint ({err}); resume from an earlier "
                            f"step-NNNNNNNN directory")
        self.protected = path
        log.info("resumed from %s (step %d)", path, state["step"])
        return state

    @staticmethod
    def _restore(path, model, optimizer):
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in load_weights(
            os.path.join(path, "model.safetensors")).items()})
        with open(os.path.join(path, "optimizer.json"), encoding="utf-8") as fh:
            scalars = json.load(fh)
        optimizer.set_state_dict(join_optimizer_state(load_file(os.path.join(path, "optimizer.safetensors")),
                                                      scalars, list(model.named_parameters())))
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as fh:
            return json.load(fh)


def check_complete(path):
    """``path`` holds every file a checkpoint writes, or a one-line ``UserError`` naming the missing ones."""
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        what = "no such directory" if not os.path.isdir(path) else f"{', '.join(missing)} missing"
        raise UserError(f"--resume_from {path}: not a complete checkpoint ({what}); give a step-NNNNNNNN "
                        f"directory under checkpoints/, or --resume for the newest")


def resume_path(cfg, checkpointer):
    """The checkpoint to continue from: ``--resume_from DIR``, or the newest with ``--resume``."""
    if cfg.resume_from:
        check_complete(cfg.resume_from)
        return cfg.resume_from
    if cfg.resume:
        latest = checkpointer.latest()
        if latest is None:
            log.info("--resume: no checkpoint under %s yet; starting from scratch", checkpointer.root)
        return latest
    return None


@contextmanager
def stop_on_signals():
    """Record SIGINT/SIGTERM instead of dying mid-step; the loop checks ``flag['signum']``."""
    flag = {"signum": None}

    def handler(signum, _frame):
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
