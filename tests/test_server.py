"""tools/serve.py as a client sees it: the real server in a subprocess on a free port, over HTTP.

The model is the tiny export of ``conftest.build_tiny_export`` (two training steps: it tags real,
wrong entities). The main server runs on the default backend (ONNX Runtime on CPU); the queue and
shutdown server on Paddle Inference where it is installed, else on ONNX Runtime (the deploy install,
tests/serving_tests.txt).
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import threading
import time

import httpx
import pytest
from conftest import ROOT, exported_dir
from conftest import run_tool as tool

from ner_compress.core.compat import PADDLE_VERSION
from ner_compress.deploy.backends import DEFAULT_BACKEND, load_tagger
from ner_compress.core.errors import UserError
from ner_compress.measure.server_probes import stall_mid_body
from ner_compress.measure.server_process import ServerProcess
from ner_compress.serve.service import ServeOptions, check_options

BODY_TIMEOUT_S, MAX_CONNECTIONS = 2, 30
LIMITS = ("--max_body_bytes", 100_000, "--max_texts", 20, "--max_chars", 3_000,
          "--body_timeout_s", BODY_TIMEOUT_S, "--max_connections", MAX_CONNECTIONS)
TEXTS = ["中国人民银行在北京召开会议，李明出席了会议。", "", "上海浦东新区人民政府今天发布通知。",
         "新华社记者王小明报道：联合国秘书长访问中国。" * 12]  # the last: 264 characters, 5 windows of 64


QUEUE_SERVER_BACKEND = "paddle" if PADDLE_VERSION else "onnxruntime"
needs_paddle = pytest.mark.skipif(PADDLE_VERSION is None, reason="Paddle Inference: not in the deploy install")


@pytest.fixture(scope="module")
def model_dir(served_export):
    return served_export


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One server for the API and limit tests; 100 warm-up calls make the not-ready phase visible."""
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    with ServerProcess(model_dir, "--decoding", "argmax", "--warmup_batches", 100, *LIMITS, log_path=log) as srv:
        yield srv


def metric(text, name, **labels):
    """The value of one sample in the Prometheus text, 0 if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_ready_only_after_warmup_while_health_answers(server):
    first_ready = next(i for i, (_, _, ready) in enumerate(server.observed) if ready == 200)
    before = server.observed[:first_ready]
    assert before, "the server was ready at the very first poll: warm-up was not observable"
    assert all(ready in (None, 503) for _, _, ready in before)
    assert any(health == 200 and ready == 503 for _, health, ready in before), server.observed
    assert "model warmed up: 100 predictor calls" in server.log_tail(100_000)


def test_predict_equals_predict_tool_including_a_windowed_text(server, model_dir):
    offline = tool("predict.py", "--model_dir", model_dir, "--decoding", "argmax",
                   *[arg for text in TEXTS for arg in ("--text", text)])
    expected = [json.loads(line) for line in offline.stdout.strip().splitlines()]
    answer = httpx.post(server.url + "/predict", json={"texts": TEXTS}, timeout=30)
    assert answer.status_code == 200
    assert answer.json() == {"results": expected}
    long_entities = expected[-1]["entities"]
    assert any(e["start"] >= 62 for e in long_entities), "no entity past the first window: nothing stitched"
    assert sum(len(r["entities"]) for r in expected) > 5


def test_empty_list_is_answered_without_a_predictor_call(server):
    calls = metric(server.metrics_text(), "ner_batch_texts_count")
    answer = httpx.post(server.url + "/predict", json={"texts": []}, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"results": []}
    assert metric(server.metrics_text(), "ner_batch_texts_count") == calls


def stream_bytes(total, chunk=16_384):
    for start in range(0, total, chunk):
        yield b" " * min(chunk, total - start)


@pytest.mark.parametrize("content, status, message", [
    (b"x" * 200_000, 413, "over --max_body_bytes 100000"),  # declared Content-Length
    (stream_bytes(500_000), 413, "over --max_body_bytes 100000"),  # chunked: counted as it streams
    (b'{"texts": ["\xff\xfe"]}', 400, "not valid UTF-8"),
    (b'{"texts": ["a"', 400, "body: not valid JSON"),
    (b'["a", "b"]', 400, "body: expected a JSON object"),
    (b'{"text": ["a"]}', 400, "body: unknown field 'text'"),
    (b"{}", 400, "texts: missing"),
    (b'{"texts": "a"}', 400, "texts: expected a list of strings"),
    (b'{"texts": ["a", 3]}', 400, "texts[1]: expected a string, got int"),
    (json.dumps({"texts": [""] * 21}).encode(), 413, "over --max_texts 20"),
    (json.dumps({"texts": ["a", "中" * 3001]}).encode(), 413, "texts[1]: 3001 characters is over --max_chars 3000"),
    (b'{"texts": ["\\ud800"]}', 400, "texts[0]: unpaired surrogate"),
    (b"[" * 50_000, 400, "nested too deeply"),
])
def test_each_limit_is_a_json_error_and_serving_goes_on(server, content, status, message):
    answer = httpx.post(server.url + "/predict", content=content, headers={"Content-Type": "application/json"},
                        timeout=30)
    assert answer.status_code == status
    body = answer.json()
    assert message in body["error"] and body["request_id"] == answer.headers["x-request-id"]
    assert httpx.post(server.url + "/predict", json={"texts": ["李明"]}, timeout=30).status_code == 200


def test_concurrent_requests_share_predictor_calls(server):
    before = server.metrics_text()
    answers = [None] * 24

    def one(i):
        answers[i] = httpx.post(server.url + "/predict", json={"texts": [TEXTS[0]]}, timeout=30)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.metrics_text()
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert all(a.json()["results"][0]["text"] == TEXTS[0] for a in answers)
    calls = metric(after, "ner_batch_texts_count") - metric(before, "ner_batch_texts_count")
    single = metric(after, "ner_batch_texts_bucket", le="1") - metric(before, "ner_batch_texts_bucket", le="1")
    assert calls < len(answers), f"{calls} predictor calls for {len(answers)} one-text requests"
    assert calls - single >= 1, "no predictor call held more than one text"


def test_metrics_and_access_log_count_requests(server):
    text = server.metrics_text()
    assert metric(text, "ner_http_requests_total", path="/predict", status="200") >= 1
    assert metric(text, "ner_http_requests_total", path="/predict", status="413") >= 1
    assert metric(text, "ner_request_duration_seconds_count") >= metric(
        text, "ner_http_requests_total", path="/predict", status="200")
    assert metric(text, "ner_ready") == 1.0
    assert re.search(r"POST /predict 413 texts=0 [\d.]+ms id=[0-9a-f]{16}", server.log_tail(1_000_000))
    assert re.search(r"POST /predict 200 texts=4 [\d.]+ms", server.log_tail(1_000_000))


def test_client_leaving_mid_body_is_logged_and_serving_goes_on(server):
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000\r\n\r\n{\"texts\": [\"" + b"a" * 1000)
    deadline = time.monotonic() + 10
    while metric(server.metrics_text(), "ner_http_requests_total", path="/predict", status="499") < 1:
        assert time.monotonic() < deadline, "the disconnect was never recorded"
        time.sleep(0.05)
    assert httpx.post(server.url + "/predict", json={"texts": ["李明"]}, timeout=30).status_code == 200


def test_openapi_page_documents_predict(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["texts"]
    assert {"413", "503", "500"} <= set(spec["paths"]["/predict"]["post"]["responses"])


def test_health_and_start_up_log_name_the_default_backend_and_the_model(server, model_dir):
    assert ServeOptions(model_dir="x").backend == DEFAULT_BACKEND == "onnxruntime"
    assert ServeOptions(model_dir="x", device="gpu").backend == "paddle"  # ONNX Runtime is CPU-only here
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health == {"status": "ok", "backend": "onnxruntime", "precision": "fp32", "device": "cpu",
                      "model_dir": os.path.abspath(model_dir)}
    assert f"serving {os.path.abspath(model_dir)} through onnxruntime fp32 (cpu)" in server.log_tail(1_000_000)


def test_int8_server_answers_what_the_int8_tagger_tags_and_says_so(model_dir, tmp_path):
    with ServerProcess(model_dir, "--precision", "int8", "--decoding", "argmax", "--warmup_batches", 1,
                       log_path=tmp_path / "server.log") as srv:
        health = httpx.get(srv.url + "/health", timeout=10).json()
        answer = httpx.post(srv.url + "/predict", json={"texts": TEXTS[:3]}, timeout=30)
        log = srv.log_tail(1_000_000)
    assert (health["backend"], health["precision"]) == ("onnxruntime", "int8")
    assert "through onnxruntime int8 (cpu)" in log
    int8 = load_tagger(str(model_dir), "onnxruntime", precision="int8", decoding="argmax")
    assert answer.status_code == 200 and answer.json() == {"results": int8.predict(TEXTS[:3])}


def test_client_stopping_mid_body_gets_408_and_the_connection_closed(server):
    status, received, closed = stall_mid_body(server.host, server.port, wait_s=BODY_TIMEOUT_S + 10)
    assert status == 408, f"no 408 within {BODY_TIMEOUT_S + 10} s: {received!r}"
    assert f"not complete within --body_timeout_s {BODY_TIMEOUT_S} s" in received
    assert closed, "the server answered but kept the connection open"
    assert httpx.post(server.url + "/predict", json={"texts": ["李明"]}, timeout=30).status_code == 200


def poll_health_until(server, status, seconds=15):
    """GET /health on a new connection until it answers ``status`` (open sockets close asynchronously)."""
    deadline, seen = time.monotonic() + seconds, None
    while seen != status:
        assert time.monotonic() < deadline, f"/health kept answering {seen}, never {status}"
        seen = httpx.get(server.url + "/health", timeout=10).status_code
    return seen


def test_connections_beyond_the_cap_get_503_and_serving_resumes_once_released(server):
    idle = [socket.create_connection((server.host, server.port)) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        poll_health_until(server, 200)  # the cap's last connection is served
        idle.append(socket.create_connection((server.host, server.port)))
        poll_health_until(server, 503)  # one more is not
    finally:
        for sock in idle:
            sock.close()
    poll_health_until(server, 200)
    assert httpx.post(server.url + "/predict", json={"texts": ["李明"]}, timeout=30).status_code == 200


# --- queue and shutdown: a server of their own, one slow request in flight ----------------------

SLOW_TEXTS = ["中国人民银行在北京召开会议" * 600] * 10  # about a second of tagging on an idle machine


@pytest.fixture(scope="module")
def small_queue_server(model_dir, tmp_path_factory):
    """On Paddle Inference where installed; shared by the backend test, the queue test and then the SIGTERM
    test, which ends it."""
    log = tmp_path_factory.mktemp("small_queue") / "server.log"
    with ServerProcess(model_dir, "--backend", QUEUE_SERVER_BACKEND, "--max_queue", 12, "--max_texts", 12,
                       "--max_chars", 10_000, "--warmup_batches", 2, log_path=log) as srv:
        yield srv


@needs_paddle
def test_paddle_backend_serves_what_the_predict_tool_tags(small_queue_server, model_dir):
    assert httpx.get(small_queue_server.url + "/health", timeout=10).json()["backend"] == "paddle"
    expected = load_tagger(str(model_dir), "paddle").predict(TEXTS)  # what tools/predict.py --backend paddle runs
    answer = httpx.post(small_queue_server.url + "/predict", json={"texts": TEXTS}, timeout=30)
    assert answer.status_code == 200 and answer.json() == {"results": expected}


def send_slow_request(server):
    """Start the slow request in a thread; return once the server holds its texts."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(answer=httpx.post(
        server.url + "/predict", json={"texts": SLOW_TEXTS}, timeout=120)))
    thread.start()
    deadline = time.monotonic() + 30
    while metric(server.metrics_text(), "ner_queued_texts") < len(SLOW_TEXTS):
        assert time.monotonic() < deadline and thread.is_alive(), "the slow request never reached the queue"
        time.sleep(0.01)
    return thread, box


def test_full_queue_answers_503_with_retry_after(small_queue_server):
    thread, box = send_slow_request(small_queue_server)
    refused = httpx.post(small_queue_server.url + "/predict", json={"texts": ["a", "b", "c"]}, timeout=30)
    thread.join()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max_queue is 12" in refused.json()["error"]
    assert box["answer"].status_code == 200
    assert httpx.post(small_queue_server.url + "/predict", json={"texts": ["a", "b", "c"]}).status_code == 200


def test_sigterm_finishes_the_request_in_flight_and_exits_0(small_queue_server):
    thread, box = send_slow_request(small_queue_server)
    small_queue_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    still_in_flight = thread.is_alive()
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(small_queue_server.url + "/health", timeout=5)
    thread.join()
    assert still_in_flight, "the slow request ended before the server could be tested mid-flight"
    assert box["answer"].status_code == 200
    assert [r["text"] for r in box["answer"].json()["results"]] == SLOW_TEXTS
    assert small_queue_server.process.wait(30) == 0


# --- failures inside the server: the app in-process, with a tagger that fails on demand ----------

class ExplodingTagger:
    """Tags "boom" by raising, as a broken predictor would; everything else gets no entities."""
    max_seq_length = 16

    def predict(self, texts):
        if "boom" in texts:
            raise RuntimeError("predictor exploded")
        return [{"text": t, "entities": []} for t in texts]


@pytest.fixture
def captured_log():
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ner_compress")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def in_process_client(load_tagger):
    import warnings

    with warnings.catch_warnings():  # starlette nags about its httpx-based client; it works as documented
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from ner_compress.serve.http_api import create_app
    from ner_compress.serve.service import ServeOptions

    return TestClient(create_app(ServeOptions(model_dir="-", warmup_batches=1), load_tagger))


def wait_until(predicate, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_internal_error_is_500_with_request_id_and_logged_traceback(captured_log):
    with in_process_client(ExplodingTagger) as client:
        wait_until(lambda: client.get("/ready").status_code == 200)
        answer = client.post("/predict", json={"texts": ["boom"]})
        assert answer.status_code == 500
        body = answer.json()
        assert body["request_id"] == answer.headers["x-request-id"]
        assert "exploded" not in answer.text and "Traceback" not in answer.text
        logged = [r for r in captured_log if body["request_id"] in r.getMessage()]
        assert logged and logged[0].exc_info and "predictor exploded" in str(logged[0].exc_info[1])
        assert client.post("/predict", json={"texts": ["fine"]}).status_code == 200


def test_model_that_fails_to_load_keeps_ready_503_with_the_reason(captured_log):
    def broken():
        raise OSError("model.pdiparams: truncated")

    with in_process_client(broken) as client:
        wait_until(lambda: any("failed to load" in r.getMessage() for r in captured_log))
        ready = client.get("/ready")
        assert ready.status_code == 503 and "truncated" in ready.json()["error"]
        assert client.get("/health").status_code == 200
        assert client.post("/predict", json={"texts": ["a"]}).status_code == 503


# --- flags refused before anything starts ---------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    *[({name: 0}, f"--{name} 0: must be at least 1") for name in (
        "port", "workers", "max_batch_size", "max_queue", "max_body_bytes", "max_texts", "max_chars",
        "max_connections")],
    ({"port": 70_000}, "--port 70000: must be at most 65535"),
    ({"max_wait_ms": -1}, "--max_wait_ms and --warmup_batches: must not be negative"),
    ({"warmup_batches": -1}, "--max_wait_ms and --warmup_batches: must not be negative"),
    ({"body_timeout_s": 0}, "--body_timeout_s 0: must be more than 0 seconds"),
    ({"body_timeout_s": float("nan")}, "--body_timeout_s nan: must be more than 0 seconds"),
    ({"max_connections": 10 ** 9}, "--max_connections 1000000000: over this process's open-file limit"),
    ({"max_texts": 3000}, "--max_texts 3000 is over --max_queue 2048"),
    ({"decoding": "beam"}, "--decoding beam: use one of"),
    ({"backend": "tensorrt"}, "--backend tensorrt: unknown; use one of paddle, onnxruntime"),
    ({"backend": "onnxruntime", "device": "gpu"}, "--backend onnxruntime: CPU only here; use --backend paddle"),
    ({"precision": "bf16"}, "--precision bf16: unknown; use one of fp32, fp16, int8"),
    ({"precision": "fp16"}, "--precision fp16: Paddle Inference on GPU only; use --backend paddle --device gpu"),
    ({"backend": "paddle", "tensorrt": True}, "--tensorrt: Paddle Inference on GPU only"),
    ({"backend": "paddle", "precision": "int8"}, "--precision int8: ONNX Runtime's export only"),
    ({"model_dir": "/nonexistent/static"}, "--model_dir /nonexistent/static: no such directory"),
    ({"model_dir": ROOT}, f"{ROOT}: not an exported static model"),
])
def test_each_refused_flag_is_one_line_naming_it(model_dir, changes, message):
    opts = dataclasses.replace(ServeOptions(model_dir=str(model_dir)), **changes)
    with pytest.raises(UserError) as refused:
        check_options(opts)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_default_backend_without_its_onnx_file_is_refused_naming_the_way_out(model_dir, tmp_path):
    static = shutil.copytree(model_dir, exported_dir(tmp_path))  # no onnx/ beside it
    check_options(ServeOptions(model_dir=str(model_dir)))  # the real export passes
    with pytest.raises(UserError, match=r"--backend onnxruntime: no .*onnx/model\.onnx; re-export .* --backend paddle"):
        check_options(ServeOptions(model_dir=str(static)))
    refused = tool("serve.py", "--model_dir", static, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "error: --backend onnxruntime: no ")


def test_load_test_tool_drives_the_server_with_locust(model_dir, tmp_path):
    """tools/loadtest.py end to end, short: Locust's clients reach the server, every request counts, and
    each abusive request gets its status."""
    tool("loadtest.py", "--model_dir", model_dir, "--clients", 2, "--seconds", 2, "--sentences", 40,
         "--output_dir", tmp_path)
    with open(tmp_path / "report" / "loadtest.json", encoding="utf-8") as fh:
        results = json.load(fh)
    (model,) = results["models"]
    (level,) = model["levels"]
    assert level["clients"] == 2 and level["requests"] > 0 and level["errors"] == 0
    statuses = [(row["case"].split(" (")[0], row["status"]) for row in model["abuse"]]
    assert statuses == [("baseline: GET /health", 200), ("50 MB body, Content-Length declared", 413),
                        ("50 MB body, chunked", 413), ("10,000 empty texts", 413), ("invalid UTF-8", 400),
                        ("1,000,000-character text", 413), ("client leaves mid-body", "-"),
                        ("client leaves mid-inference", "-"), ("client stops mid-body", 408),
                        ("then a normal request", 200)], model["abuse"]
    assert "connection closed" in model["abuse"][-2]["answer"]
    (abuse_target,) = [t for t in results["targets"] if "each answered as expected" in t["target"]]
    assert abuse_target["met"] is True
    assert level["p50_ms"] <= level["p99_ms"] and level["sentences_per_s"] > 0
    assert (tmp_path / "report" / "loadtest.md").read_text(encoding="utf-8").count("| teacher | 2 |") == 1

