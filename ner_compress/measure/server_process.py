"""The HTTP server (``python -m ner_compress.serve``) as a child process on a free local port: start, wait
until ready, stop.

Used by the load test and the server tests, so both talk to the real server over HTTP.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# the directory that holds the ner_compress package: the child imports the same code as this process
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_MODULE = "ner_compress.serve"


def child_environment():
    """This process's environment with the package's parent first on the path (a checkout or an install)."""
    path = [PACKAGE_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def free_port(host="127.0.0.1"):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_status(url, timeout=5.0):
    """The status code of ``GET url``, or None when nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (ConnectionError, urllib.error.URLError, socket.timeout):
        return None


class ServerProcess:
    """``with ServerProcess(model_dir, "--max_texts", 8) as server: server.url``."""

    def __init__(self, model_dir, *flags, log_path=None, python=sys.executable, host="127.0.0.1",
                 launcher=("-m", SERVE_MODULE)):
        """``launcher``: what follows ``python`` before the server's flags (a test wraps the module in ``-c``)."""
        self.host, self.port = host, free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.command = [python, *launcher, "--model_dir", str(model_dir), "--host", host,
                        "--port", str(self.port), *map(str, flags)]
        self.log_path = log_path
        self.process = None
        self.observed = []  # (seconds since start, /health status, /ready status) while waiting

    def start(self):
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=log, stderr=log, env=child_environment())
        if self.log_path:
            log.close()
        return self

    def wait_ready(self, timeout=180.0, poll_s=0.02):
        """Poll /health and /ready from the start until /ready says 200; record what was seen."""
        while time.monotonic() - self.started_at < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode} before it was ready: {self.log_tail()}")
            health, ready = http_status(self.url + "/health"), http_status(self.url + "/ready")
            self.observed.append((time.monotonic() - self.started_at, health, ready))
            if ready == 200:
                return self
            time.sleep(poll_s)
        raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")

    def metrics_text(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode("utf-8")

    def post_json(self, path, payload, timeout=60):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode("utf-8"),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def rss_bytes(self):
        """Resident memory of the server process (Linux /proc), or None once it has gone."""
        try:
            with open(f"/proc/{self.process.pid}/status", encoding="utf-8") as fh:
                kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            return kb * 1024
        except (OSError, StopIteration):
            return None

    def stop(self, timeout=60.0):
        """SIGTERM, then wait for the graceful exit (SIGKILL only past ``timeout``); the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"server ignored SIGTERM for {timeout:.0f} s and was killed")

    def log_tail(self, chars=3000):
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()[-chars:]

    def __enter__(self):
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
