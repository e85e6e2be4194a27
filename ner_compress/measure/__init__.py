"""Measurement: the benchmark (F1, parameters, disk, batch-1 latency and batch-32 throughput per model,
backend and precision, each in a fresh process), the report's targets, the Locust load test against a child
server, and the one latency/percentile helper they share."""
