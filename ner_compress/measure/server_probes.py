"""Abusive requests against a running server, each with the answer it should get, and its memory after.

A 50 MB body (declared and streamed), 10,000 empty texts, invalid UTF-8, a 1,000,000-character
text, clients that leave mid-body and mid-inference, a client that stops mid-body (408 once the
server's ``--body_timeout_s`` has passed), then one normal request that must succeed.
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


def _request_start(declared_length, body):
    return (b"POST /predict HTTP/1.1\r\nHost: loadtest\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {declared_length}\r\n\r\n".encode() + body)


def _leave(server, body, declared_length):
    """Send headers and ``body``, then close the socket without reading an answer."""
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(_request_start(declared_length, body))
    time.sleep(0.5)  # let the server notice
    return None, "client closed the connection"


def stall_mid_body(host, port, wait_s):
    """Send headers announcing 100 bytes and 1 byte of body, then read for up to ``wait_s``: (status or
    None, what arrived, whether the server then closed the connection)."""
    received, closed = b"", False
    deadline = time.monotonic() + wait_s
    with socket.create_connection((host, port)) as sock:
        sock.sendall(_request_start(100, b"{"))
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
        except (socket.timeout, ConnectionError):
            pass
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else None
    return status, received.decode("utf-8", "replace"), closed


def _stall(server, body_timeout_s):
    status, received, closed = stall_mid_body(server.host, server.port, body_timeout_s + 10)
    answer = received.rpartition("\r\n\r\n")[2][:120] or "no answer"
    return status, f"{answer}; connection {'closed' if closed else 'left open'}"


def abuse_checks(server, body_timeout_s):
    """Rows of {case, status, answer, rss_mb, as_expected}; the first row is the baseline.
    ``body_timeout_s``: the server's ``--body_timeout_s`` (the stalled client waits that long)."""
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
        (f"client stops mid-body (1 of 100 bytes; --body_timeout_s {body_timeout_s:g})",
         lambda: _stall(server, body_timeout_s), {408}),
        ("then a normal request", lambda: _post(server.url, json={"texts": ["李明在北京工作。"]}), {200}),
    ]
    rows = []
    for case, send, expected in cases:
        status, answer = send()
        rows.append({"case": case, "status": "-" if status is None else status, "answer": answer,
                     "rss_mb": (server.rss_bytes() or 0) / MB, "as_expected": status in expected})
    return rows
