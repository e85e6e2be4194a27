"""Abusive requests against a running server, each with the answer it should get, and its memory after.

A 50 MB body (declared and streamed), 10,000 empty texts, invalid UTF-8, a 1,000,000-character
text, clients that leave mid-body and mid-inference, then one normal request that must succeed.
"""
import socket
import time

import httpx

MB = 1024 * 1024


def _streamed(total, chunk=1 << 20):
    for start in range(0, total, chunk):
        yield b" " * min(chunk, total - start)


def _post(url, **kwargs):
    try:
        answer = httpx.post(url + "/predict", timeout=120, **kwargs)
    except httpx.HTTPError as err:
        return None, f"{type(err).__name__}: {err}"
    try:
        return answer.status_code, answer.json().get("error") or f"{len(answer.json()['results'])} results"
    except ValueError:
        return answer.status_code, answer.text[:120]


def _leave(server, body, declared_length):
    """Send headers and ``body``, then close the socket without reading an answer."""
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: loadtest\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {declared_length}\r\n\r\n".encode() + body)
    time.sleep(0.5)  # let the server notice
    return None, "client closed the connection"


def abuse_checks(server):
    """Rows of {case, status, answer, rss_mb, as_expected}; the first row is the baseline."""
    full_request = ('{"texts": [' + ",".join(['"' + "北京" * 1000 + '"'] * 64) + "]}").encode("utf-8")
    cases = [
        ("baseline: GET /health", lambda: (httpx.get(server.url + "/health").status_code, "ok"), {200}),
        ("50 MB body, Content-Length declared", lambda: _post(server.url, content=b"x" * (50 * MB)), {413}),
        ("50 MB body, chunked", lambda: _post(server.url, content=_streamed(50 * MB)), {413}),
        ("10,000 empty texts", lambda: _post(server.url, json={"texts": [""] * 10_000}), {413}),
        ("invalid UTF-8", lambda: _post(server.url, content=b'{"texts": ["\xff\xfe\xfd"]}'), {400}),
        ("1,000,000-character text", lambda: _post(server.url, json={"texts": ["中" * 1_000_000]}), {413}),
        ("client leaves mid-body", lambda: _leave(server, full_request[:1000], len(full_request)), {None}),
        ("client leaves mid-inference (64 x 2,000 chars)", lambda: _leave(server, full_request, len(full_request)),
         {None}),
        ("then a normal request", lambda: _post(server.url, json={"texts": ["李明在北京工作。"]}), {200}),
    ]
    rows = []
    for case, send, expected in cases:
        status, answer = send()
        rows.append({"case": case, "status": "-" if status is None else status, "answer": answer,
                     "rss_mb": (server.rss_bytes() or 0) / MB, "as_expected": status in expected})
    return rows
