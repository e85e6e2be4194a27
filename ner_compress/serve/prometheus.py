"""The server's counters and histograms, rendered in the Prometheus text format (version 0.0.4).

Hand-written: three metric families do not justify a dependency. Updated from the event loop and
the predictor thread alike, so every change takes one lock.
"""
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _number(value):
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    def __init__(self, buckets):
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.total = 0
        self.count = 0

    def observe(self, value):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name):
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


class ServerMetrics:
    """Requests by path and status, request latency, texts per predictor call, and two gauges."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {}  # (path, status) -> count
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_texts = Histogram(BATCH_BUCKETS)
        self.batches = 0

    def record_request(self, path, status, seconds):
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if path == "/predict":
                self.latency.observe(seconds)

    def record_batch(self, texts):
        with self._lock:
            self.batch_texts.observe(texts)
            self.batches += 1

    def render(self, queued_texts, ready):
        with self._lock:
            lines = ["# HELP ner_http_requests_total HTTP requests answered, by path and status code.",
                     "# TYPE ner_http_requests_total counter"]
            lines += [f'ner_http_requests_total{{path="{path}",status="{status}"}} {count}'
                      for (path, status), count in sorted(self.requests.items())]
            lines += ["# HELP ner_request_duration_seconds Time from request start to response, POST /predict.",
                      "# TYPE ner_request_duration_seconds histogram",
                      *self.latency.lines("ner_request_duration_seconds"),
                      "# HELP ner_batch_texts Texts per predictor call (dynamic batching gathers requests).",
                      "# TYPE ner_batch_texts histogram", *self.batch_texts.lines("ner_batch_texts")]
        lines += ["# HELP ner_queued_texts Texts accepted and not yet answered.", "# TYPE ner_queued_texts gauge",
                  f"ner_queued_texts {queued_texts}",
                  "# HELP ner_ready 1 once the model is loaded and warmed up.", "# TYPE ner_ready gauge",
                  f"ner_ready {int(bool(ready))}"]
        return "\n".join(lines) + "\n"
