"""Accuracy-aware INT8: the whole graph quantized, or, when that loses more dev F1 than allowed, the fewest most
sensitive layers left in FP32.

Sensitivity is cheap and measured on the calibration (training) windows: for each layer, the copy with only that
layer's quantizable nodes left in FP32 is run and its log-probabilities compared with FP32's (mean KL over real
characters); the layer whose exclusion brings the copy closest to FP32 is the most sensitive. Then each of the
few most sensitive is left in FP32 alone and scored on dev, then growing combinations of them, until a copy is
within the margin (at most half the layers: beyond that little of INT8's speed is left). Layers are read off
the graph: a quantizable node belongs to the encoder layer of the layer norms before it (two per post-LN layer),
those before the first norm to ``embeddings``, those after the last to ``head`` (the classifier); a graph
without layer norms is searched node by node. Measured on the default run's teacher (docs/benchmark.md): the
last layer is the sensitive one.
"""
import os
import shutil
import tempfile
import time

import numpy as np
import onnx

from ner_compress.core.console import detail
from ner_compress.data.decoding import log_softmax
from ner_compress.deploy import onnx_quant

# the nodes each method gives int8 weights (dynamic: also the embedding tables of a fused EmbedLayerNormalization)
WEIGHT_OPS = {"dynamic": ("EmbedLayerNormalization", "Gather", "Attention", "MatMul", "Gemm"),
              "static": ("MatMul", "Gemm")}
LAYER_NORMS = ("EmbedLayerNormalization", "LayerNormalization", "SkipLayerNormalization",
               "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
SPEED_BATCH_SIZE, SPEED_REPEATS = 32, 3
# the calibration KL only narrows the field (on the default run's teacher it put the last layer third, and that
# layer alone is what brings dev F1 back): this many of the top layers are each scored on dev alone first
SINGLES = 3


def layer_groups(model, method):
    """[(layer name, [node names])] of the nodes ``method`` quantizes, in graph order (see the module docstring)."""
    nodes = [n for n in model.graph.node if n.name]
    norms = sum(n.op_type in LAYER_NORMS for n in nodes)
    groups, seen = {}, 0
    for node in nodes:
        if node.op_type in WEIGHT_OPS[method]:
            groups.setdefault(layer_name(node, seen, norms), []).append(node.name)
        seen += node.op_type in LAYER_NORMS
    return list(groups.items())


def layer_name(node, norms_before, norms):
    if not norms:
        return node.name
    if norms_before == 0:
        return "embeddings"
    return "head" if norms_before == norms else f"layer {(norms_before - 1) // 2}"


def describe(layers, nodes):
    if not nodes:
        return "whole graph"
    return f"{len(nodes)} node{'s' * (len(nodes) > 1)} kept in FP32 ({', '.join(layers)})"


def real_log_probs(logits_fn, feeds, pad_id):
    """Log-probabilities at the real (unpadded) positions of ``feeds``, concatenated."""
    return np.concatenate([log_softmax(logits_fn(f["input_ids"], f["token_type_ids"]))[f["input_ids"] != pad_id]
                           for f in feeds])


def mean_kl(reference, other):
    return float(np.mean(np.sum(np.exp(reference) * (reference - other), axis=-1)))


class Search:
    """The copies of one FP32 graph tried by ``best_copy``, written in a scratch directory beside it.

    ``logits_for(path)``: a numpy logits function running that graph; ``judge(logits_fn)``: its dev parity
    (``onnx_quant.DevParity``); ``feeds``: calibration windows (training split) as feed dicts."""

    def __init__(self, fp32_path, feeds, pad_id, logits_for, judge, max_drop):
        self.fp32_path, self.feeds, self.pad_id = fp32_path, feeds, pad_id
        self.logits_for, self.judge, self.max_drop = logits_for, judge, max_drop
        self.scratch = tempfile.mkdtemp(prefix=".int8-search-", dir=os.path.dirname(fp32_path))
        self.fp32_log_probs = real_log_probs(logits_for(fp32_path), feeds, pad_id)
        self.model = onnx.load(fp32_path, load_external_data=False)
        self.tried, self.sensitivity, self.count = [], {}, 0

    def close(self):
        shutil.rmtree(self.scratch, ignore_errors=True)

    def quantize(self, method, nodes):
        self.count += 1
        path = os.path.join(self.scratch, f"{method}-{self.count}.onnx")
        return onnx_quant.quantize(method, self.fp32_path, path, self.feeds, nodes,
                                   os.path.join(self.scratch, "calibration.json"))

    def try_copy(self, method, layers=()):
        """Quantize with ``layers`` ([(name, nodes)]) in FP32 and score it on dev; the tried configuration."""
        names, nodes = [n for n, _ in layers], [x for _, group in layers for x in group]
        path = self.quantize(method, nodes)
        tried = {"method": method, "configuration": describe(names, nodes), "layers_fp32": names,
                 "nodes_fp32": nodes, **self.judge(self.logits_for(path)), "path": path}
        tried["passed"] = tried["f1_drop_points"] <= self.max_drop
        detail.info("ONNX INT8 (%s, %s): dev F1 %.2f -> %.2f, entity agreement %.2f", method, tried["configuration"],
                 tried["dev_f1_fp32"], tried["dev_f1_int8"], tried["entity_agreement_f1"])
        self.tried.append(tried)
        return tried

    def ranked_layers(self, method):
        """The layers, most sensitive first: the calibration KL from FP32 with only that layer left in FP32."""
        scores = []
        for name, nodes in layer_groups(self.model, method):
            logits = self.logits_for(self.quantize(method, nodes))
            scores.append({"layer": name, "nodes": nodes,
                           "calibration_kl": mean_kl(self.fp32_log_probs, real_log_probs(logits, self.feeds,
                                                                                         self.pad_id))})
        scores.sort(key=lambda s: s["calibration_kl"])
        self.sensitivity[method] = scores
        return [(s["layer"], s["nodes"]) for s in scores]

    def search(self, method, leave_fp32=True):
        """The whole-graph copy if it passes, else (``leave_fp32``) one with the fewest sensitive layers in FP32
        that passes: each of the ``SINGLES`` most sensitive alone, then growing combinations; None if none does."""
        whole = self.try_copy(method)
        if whole["passed"] or not leave_fp32:
            return whole if whole["passed"] else None
        ranked = self.ranked_layers(method)
        singles = []
        for layer in ranked[:SINGLES]:
            tried = self.try_copy(method, [layer])
            if tried["passed"]:
                return tried
            singles.append((tried["f1_drop_points"], layer))
        # none passes alone: combine them, the least lossy on dev first, then the others by calibration KL
        order = [layer for _, layer in sorted(singles, key=lambda s: s[0])] + ranked[SINGLES:]
        for count in range(2, len(ranked) // 2 + 1):
            tried = self.try_copy(method, order[:count])
            if tried["passed"]:
                return tried
        return None


def seconds_per_pass(logits_fns, feeds, repeats=SPEED_REPEATS):
    """Median seconds of one pass over ``feeds`` for each function, their runs interleaved (after a warm-up),
    so that other work on the machine weighs on all of them alike."""
    times = [[] for _ in logits_fns]
    for repeat in range(repeats + 1):
        for fn, spent in zip(logits_fns, times):
            start = time.perf_counter()
            for f in feeds:
                fn(f["input_ids"], f["token_type_ids"])
            if repeat:
                spent.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def speed_feeds(windows, pad_id):
    """``windows`` length-sorted in batches of ``SPEED_BATCH_SIZE``, the benchmark's batch."""
    ordered = sorted(windows, key=lambda w: len(w.input_ids))
    return onnx_quant.calibration_feeds(ordered, pad_id, SPEED_BATCH_SIZE)


def without_path(tried):
    return {k: v for k, v in tried.items() if k != "path"}


def best_copy(search, methods, leave_fp32, speed_feeds, int8_path):
    """Search each of ``methods``; of the copies that pass, move the faster (over ``speed_feeds`` against the
    FP32 graph, interleaved) to ``int8_path``. The manifest's record of the search (``chosen`` None: none passed)."""
    passed = [c for c in (search.search(m, leave_fp32) for m in methods) if c]
    chosen = None
    if passed:
        fns = [search.logits_for(search.fp32_path)] + [search.logits_for(c["path"]) for c in passed]
        fp32_seconds, *int8_seconds = seconds_per_pass(fns, speed_feeds)
        for copy, seconds in zip(passed, int8_seconds):
            copy["speedup_vs_fp32_b32"] = fp32_seconds / seconds
        chosen = max(passed, key=lambda c: c["speedup_vs_fp32_b32"])
        shutil.move(chosen["path"], int8_path)
        chosen = without_path(chosen)
    return {"chosen": chosen, "tried": [without_path(t) for t in search.tried], "sensitivity": search.sensitivity}
