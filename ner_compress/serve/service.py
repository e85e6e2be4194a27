"""Run the HTTP service: check the flags, then uvicorn with a graceful SIGTERM.

The app is built by ``app_from_environment`` from options passed in an environment variable,
so ``--workers N`` (N uvicorn processes, each loading its own model and batching on its own)
and a single process start it the same way. On SIGTERM or SIGINT the server stops accepting,
finishes the requests in flight, drains the batcher and exits 0.
"""
import contextlib
import json
import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass

from ner_compress.deploy.backends import EngineOptions
from ner_compress.core import runtime
from ner_compress.core.options import flag_field
from ner_compress.core.errors import UserError

OPTIONS_VARIABLE = "NER_COMPRESS_SERVE_OPTIONS"
APP_FACTORY = "ner_compress.serve.service:app_from_environment"
# descriptors the process needs besides client sockets (model files, logs, the listening socket)
RESERVED_DESCRIPTORS = 64
log = logging.getLogger("ner_compress")


@dataclass
class ServeOptions(EngineOptions):
    """What ``tools/serve.py`` takes: the engine's flags, then the service's, one flag per field
    (``config.add_dataclass_flags``)."""
    host: str = flag_field("127.0.0.1", "address to listen on")
    port: int = flag_field(8189, "port to listen on")
    workers: int = flag_field(1, "processes, each with its own model copy and batching")
    max_batch_size: int = flag_field(32, "texts gathered from concurrent requests into one predictor call")
    max_wait_ms: float = flag_field(2.0, "longest wait for more texts under concurrent load (none for a lone client)")
    max_queue: int = flag_field(2048, "texts accepted and not yet answered; beyond it 503 with Retry-After")
    max_body_bytes: int = flag_field(4 << 20, "larger bodies: 413")
    max_texts: int = flag_field(1024, "texts per request; more: 413")
    max_chars: int = flag_field(100_000, "characters per text; more: 413")
    body_timeout_s: float = flag_field(30.0, "a body not complete this long after its headers: 408, connection "
                                       "closed")
    max_connections: int = flag_field(512, "open connections served per worker; a request on one more: 503, "
                                      "connection closed")
    warmup_batches: int = flag_field(20, "predictor calls before /ready says 200")
    log_level: str = flag_field("info", "uvicorn's log level", choices=["debug", "info", "warning", "error"])


def check_options(opts):
    """Every flag sane and the model directory an exported static model, before anything starts."""
    from ner_compress.data.decoding import DECODINGS

    positive = ("port", "workers", "max_batch_size", "max_queue", "max_body_bytes", "max_texts", "max_chars",
                "max_connections")
    for name in positive:
        if getattr(opts, name) < 1:
            raise UserError(f"--{name} {getattr(opts, name)}: must be at least 1")
    if opts.max_wait_ms < 0 or opts.warmup_batches < 0:
        raise UserError("--max_wait_ms and --warmup_batches: must not be negative")
    if not opts.body_timeout_s > 0:  # also refuses nan
        raise UserError(f"--body_timeout_s {opts.body_timeout_s:g}: must be more than 0 seconds")
    check_descriptors(opts.max_connections)
    if opts.port > 65535:
        raise UserError(f"--port {opts.port}: must be at most 65535")
    if opts.max_texts > opts.max_queue:
        raise UserError(f"--max_texts {opts.max_texts} is over --max_queue {opts.max_queue}: such a request "
                        "could never be queued; raise --max_queue or lower --max_texts")
    if opts.decoding not in DECODINGS:
        raise UserError(f"--decoding {opts.decoding}: use one of {', '.join(DECODINGS)}")
    if not os.path.isdir(opts.model_dir):
        raise UserError(f"--model_dir {opts.model_dir}: no such directory; give DIR/export/width_W/static")
    opts.check()  # the engine and the model's meta


def check_descriptors(max_connections):
    """Refuse a connection cap this process could not open sockets for (``ulimit -n``)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections + RESERVED_DESCRIPTORS > soft:
        raise UserError(f"--max_connections {max_connections}: over this process's open-file limit {soft} less "
                        f"{RESERVED_DESCRIPTORS} reserved; lower it or raise `ulimit -n`")


def app_from_environment():
    """uvicorn's app factory, in each worker process."""
    from ner_compress.serve.http_api import create_app

    opts = ServeOptions(**json.loads(os.environ[OPTIONS_VARIABLE]))
    runtime.setup_logging(opts.log_level)

    return create_app(opts, lambda: opts.tagger(opts.max_batch_size))


def graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's Server, minus re-raising the caught signal at exit: a SIGTERM that drained
        cleanly ends with status 0, not 143."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return GracefulServer


def serve(opts):
    import uvicorn

    check_options(opts)
    runtime.setup_logging(opts.log_level)
    log.info("serving %s through %s %s (%s) on http://%s:%d", os.path.abspath(opts.model_dir), opts.backend,
             opts.precision, opts.device, opts.host, opts.port)
    os.environ[OPTIONS_VARIABLE] = json.dumps(asdict(opts))
    # uvicorn answers 503 (and closes) a request arriving while limit_concurrency connections are open,
    # its own included: + 1 so that --max_connections connections are served
    settings = dict(host=opts.host, port=opts.port, factory=True, access_log=False, log_level=opts.log_level,
                    timeout_graceful_shutdown=None, limit_concurrency=opts.max_connections + 1)
    if opts.workers > 1:  # uvicorn's supervisor: SIGTERM ends each worker gracefully, then itself
        uvicorn.run(APP_FACTORY, workers=opts.workers, **settings)
        return
    server = graceful_server_class()(uvicorn.Config(APP_FACTORY, **settings))
    server.run()
    if not server.started:
        raise UserError(f"--host {opts.host} --port {opts.port}: the server could not start (see above)")
