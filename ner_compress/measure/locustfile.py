"""Locust users for ``loadtest``: each sends one MSRA test sentence per ``POST /predict``, back to back.

Run by ``loadtest`` as ``locust -f ner_compress/measure/locustfile.py --headless ...``, never imported by
the package (Locust patches the standard library with gevent). Settings arrive in environment
variables; every request's start, latency and outcome is written to a JSON file at exit, so the
percentiles are computed from exact times rather than Locust's rounded ones.
"""
import itertools
import json
import os
import random

from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

SENTENCES_FILE = "NER_LOADTEST_SENTENCES"
SAMPLES_FILE = "NER_LOADTEST_SAMPLES"
MAX_REQUESTS = "NER_LOADTEST_MAX_REQUESTS"

with open(os.environ[SENTENCES_FILE], encoding="utf-8") as fh:
    SENTENCES = json.load(fh)
LIMIT = int(os.environ.get(MAX_REQUESTS, "1000000"))
SAMPLES = []  # (start time s, latency ms, error or None)
SENT = itertools.count()


@events.request.add_listener
def record(request_type, name, response_time, response_length, response=None, exception=None, start_time=None,
           **kwargs):
    SAMPLES.append((start_time, response_time, None if exception is None else str(exception)[:200]))


@events.quitting.add_listener
def write_samples(environment, **kwargs):
    with open(os.environ[SAMPLES_FILE], "w", encoding="utf-8") as fh:
        json.dump(SAMPLES, fh)


class OneSentenceClient(FastHttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the answer is in

    def on_start(self):
        self.sentences = itertools.cycle(random.sample(SENTENCES, len(SENTENCES)))

    @task
    def predict(self):
        if next(SENT) >= LIMIT:
            raise StopUser()
        text = next(self.sentences)
        with self.client.post("/predict", json={"texts": [text]}, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif response.json()["results"][0]["text"] != text:
                response.failure("answer for another text")
