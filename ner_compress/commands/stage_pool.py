"""Stages that need only the teacher, side by side: one process each, with its share of the cores.

After the teacher, its width supernet and the student (then the student's own supernet) read
nothing but ``DIR/teacher``. On CPU, Paddle 2.6.2's dynamic graph runs elementwise ops, LayerNorm
and their gradients on one thread, so a 2-thread training step leaves the second core mostly idle:
the demo teacher takes 320 ms a step with 2 threads and 370 ms with 1, and two 1-thread runs side
by side 410 ms each, 1.6x the work of one 2-thread run. Each branch is a function of the Config
alone, run in a fresh ``spawn`` process (paddle is not fork-safe) with ``cpu_threads`` set to its
share. A failing branch stops the others at their next step with a checkpoint; SIGINT/SIGTERM
are passed on the same way, so ``--resume`` continues every branch.
"""
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import replace

from ner_compress.core import parallel
from ner_compress.compress import training
from ner_compress.core.checkpoint import stop_on_signals
from ner_compress.core.errors import StopRequested
from ner_compress.core.errors import UserError, run_cli

log = logging.getLogger("ner_compress")
POLL_SECONDS = 0.2


def side_by_side(cfg, branch_count):
    """Whether ``branch_count`` branches run at once: on CPU, in one process per run, with a core each."""
    if branch_count < 2 or cfg.stage_processes == 1 or cfg.device != "cpu" or parallel.world_size() > 1:
        return False
    cores = cfg.cpu_threads or os.cpu_count() or 1
    return min(cores, cfg.stage_processes or cores) >= branch_count


def run_branches(cfg, branches, data=None):
    """Run each ``(name, fn)`` as ``fn(cfg, data)``: side by side when the cores allow, else in turn here."""
    if not side_by_side(cfg, len(branches)):
        for _, fn in branches:
            fn(cfg, data)
        return
    threads = max(1, (cfg.cpu_threads or os.cpu_count()) // len(branches))
    log.info("side by side, %d CPU thread(s) each: %s", threads, "; ".join(name for name, _ in branches))
    context = multiprocessing.get_context("spawn")
    share = replace(cfg, cpu_threads=threads)
    processes = {name: context.Process(target=_branch_main, args=(fn, share), name=name) for name, fn in branches}
    with stop_on_signals() as stop:
        for process in processes.values():
            process.start()
        _wait(processes, stop)
    _raise_for(processes, stop["signum"])


def _branch_main(fn, cfg):
    """A branch's process: the tools' error handling (one line, exit 2; a stop exits 128 + signal)."""
    training.hide_progress_bars()  # several bars on one terminal garble each other; log lines remain
    run_cli(lambda: fn(cfg, None))


def _wait(processes, stop):
    """Until every branch has exited; the first failure or a signal here stops the rest (SIGTERM)."""
    stopping = False
    while any(p.is_alive() for p in processes.values()):
        failed = any(p.exitcode not in (None, 0) for p in processes.values())
        if (failed or stop["signum"]) and not stopping:
            stopping = True
            for process in processes.values():
                if process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)
        time.sleep(POLL_SECONDS)
    for process in processes.values():
        process.join()


def _raise_for(processes, signum):
    codes = {name: p.exitcode for name, p in processes.items()}
    if signum:
        raise StopRequested(signum, detail=f"with every stage checkpointed ({_describe(codes)})")
    failed = [(name, code) for name, code in codes.items() if code != 0]
    if failed:
        name, code = next(((n, c) for n, c in failed if not _was_stopped(c)), failed[0])
        raise UserError(f"stage '{name}' failed (exit {code}, its error is above); the other stages stopped "
                        f"with a checkpoint ({_describe(codes)}); fix it and rerun with --resume")


def _was_stopped(code):
    return code in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT)


def _describe(codes):
    return ", ".join(f"{name}: {'done' if code == 0 else 'stopped' if _was_stopped(code) else f'exit {code}'}"
                     for name, code in codes.items())
