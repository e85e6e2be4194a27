"""Data parallelism without ``paddle.DataParallel``: explicit gradient all-reduce.

Wrapping the OFA student in ``paddle.DataParallel`` renames its sublayers (``_layers.``), so
PaddleSlim's distillation hooks stop matching and the hidden-state loss silently becomes 0.
Reducing gradients ourselves after ``backward`` leaves the model, its names and the hooks
untouched, and works the same for the teacher. In one process every function is a no-op.
"""
import logging
import os
import sys

import paddle
import paddle.distributed as dist


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_writer():
    """Rank 0 writes artifacts, logs and progress bars."""
    return rank() == 0


def init():
    """Join the process group when started by ``paddle.distributed.launch`` with several processes."""
    if int(paddle.distributed.ParallelEnv().world_size) > 1 and not dist.is_initialized():
        dist.init_parallel_env()


def all_reduce_sum(value):
    """Sum of a float over all ranks (a plain float back)."""
    if world_size() == 1:
        return float(value)
    tensor = paddle.to_tensor([float(value)], dtype="float64")
    dist.all_reduce(tensor)
    return float(tensor.numpy()[0])


def all_reduce_gradients(parameters):
    """Sum gradients over ranks in one flat buffer (losses are already normalised globally)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = paddle.concat([g.reshape([-1]) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        size = int(g.size)
        g.set_value(flat[offset: offset + size].reshape(g.shape))
        offset += size


def broadcast_parameters(model):
    """Make every rank start from rank 0's weights."""
    if world_size() == 1:
        return
    for p in model.parameters():
        dist.broadcast(p, src=0)


def barrier():
    if world_size() > 1:
        dist.barrier()


def finish():
    """End a successful multi-process run: every rank waits for the others (rank 0 writes last), then leaves
    without running C++ destructors. Paddle's gloo/TCP-store teardown can abort (SIGABRT, launch's "Exit code -6")
    when ranks exit at different moments (seen once in CI, after every artifact was written)."""
    if world_size() == 1:
        return
    barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
