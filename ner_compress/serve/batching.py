"""Dynamic batching: requests from the event loop gathered into one ``Tagger.predict`` call.

One worker thread owns the tagger (loads it, warms it up, runs every batch), so the event loop
never blocks on inference and the predictor is never shared between threads. The worker takes
the oldest request, then whatever else is queued, up to ``max_batch_size`` texts. It waits up to
``max_wait_ms`` for more only when the previous batch held more than one request: under
concurrent load that fills batches, while a lone client pays no waiting time at all.
"""
import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("ner_compress")
_STOP = object()
WARMUP_CHARS = "中国人民银行在北京召开会议，李明出席。"


class QueueFull(Exception):
    """More texts waiting than ``--max_queue``: the client should retry later."""


@dataclass
class Job:
    texts: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def warmup_texts(max_seq_length, max_batch_size, batches):
    """``batches`` lists of texts alternating a single short text and a full batch of full windows."""
    full = (WARMUP_CHARS * (max_seq_length // len(WARMUP_CHARS) + 1))[: max(max_seq_length - 2, 1)]
    return [[WARMUP_CHARS] if i % 2 == 0 else [full] * max_batch_size for i in range(batches)]


def _settle(future, result=None, error=None):
    """On the event loop: hand over a result unless the request is gone."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DynamicBatcher:
    """``await batcher.submit(texts)`` -> the tagger's results for ``texts``."""

    def __init__(self, load_tagger, max_batch_size=32, max_wait_ms=2.0, max_queue=1024, warmup_batches=20,
                 on_batch=None):
        self._load_tagger = load_tagger
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.warmup_batches = warmup_batches
        self._on_batch = on_batch or (lambda texts: None)
        self._jobs = queue.Queue()
        self._lock = threading.Lock()
        self.queued_texts = 0  # accepted and not yet answered (waiting or being tagged)
        self.ready = threading.Event()
        self.load_error = None
        self._thread = threading.Thread(target=self._run, name="predictor", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout=None):
        """Answer everything already queued, then end the worker thread."""
        self._jobs.put(_STOP)
        self._thread.join(timeout)

    def submit(self, texts):
        """A future for the results; ``QueueFull`` when accepting would exceed ``max_queue``."""
        with self._lock:
            if self.queued_texts + len(texts) > self.max_queue:
                raise QueueFull(f"{self.queued_texts} texts queued; --max_queue is {self.max_queue}")
            self.queued_texts += len(texts)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put(Job(texts, future, loop))
        return future

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self):
        try:
            tagger = self._load_tagger()
            start = time.perf_counter()
            for texts in warmup_texts(tagger.max_seq_length, self.max_batch_size, self.warmup_batches):
                tagger.predict(texts)
            log.info("model warmed up: %d predictor calls in %.2f s", self.warmup_batches,
                     time.perf_counter() - start)
        except Exception as err:  # the process stays up and says so on /ready
            self.load_error = f"{type(err).__name__}: {err}"  # before the log line: /ready may be asked on it
            log.exception("model failed to load")
            return
        self.ready.set()
        previous_requests = 0
        while True:
            jobs = self._gather(wait=previous_requests > 1)
            if not jobs:
                return
            previous_requests = len(jobs)
            self._tag(tagger, jobs)
            if jobs[-1] is _STOP:
                return

    def _gather(self, wait):
        """The oldest job and those queued behind it, up to ``max_batch_size`` texts; a trailing
        ``_STOP`` marks the last batch."""
        first = self._jobs.get()
        if first is _STOP:
            return []
        jobs, texts = [first], len(first.texts)
        deadline = time.monotonic() + (self.max_wait_s if wait else 0.0)
        while texts < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            if job is _STOP:
                break
            texts += len(job.texts)
        return jobs

    def _tag(self, tagger, jobs):
        live = [job for job in jobs if job is not _STOP]
        texts = [text for job in live for text in job.texts]
        self._on_batch(len(texts))
        try:
            results, error = tagger.predict(texts), None
        except Exception as err:  # answered as 500 per request; the worker goes on
            results, error = None, err
        offset = 0
        for job in live:
            part = None if error else results[offset: offset + len(job.texts)]
            offset += len(job.texts)
            with self._lock:
                self.queued_texts -= len(job.texts)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, part, error)
            except RuntimeError:  # its event loop has closed: nobody is waiting
                pass
