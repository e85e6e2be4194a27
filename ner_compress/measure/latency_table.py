"""What each encoder layer costs on this machine, by attention heads and FFN neurons: the latency model a
per-layer width search budgets with.

A layer of the fused graph is ``Attention -> MatMul -> SkipLayerNorm`` (its attention part) and
``MatMul -> BiasGelu -> MatMul -> SkipLayerNorm`` (its FFN part), the ops ONNX Runtime's optimizer leaves
in our exports (``deploy/onnx_graph``). Each part is built alone with random weights, ``LAYERS_PER_GRAPH``
copies stacked so one ``run`` call's overhead is shared, and timed over the workload's shapes (real dev
sentence lengths, padded as the tagger pads them) at a few widths, through which a line is fitted. A model's
predicted latency is the rest of the graph
(embeddings, classifier, the call itself: the teacher's measured latency minus its layers) plus its layers'
parts. Tables are cached with what they were measured on (CPU, threads, library versions, workload) and
measured again when any of it differs.
"""
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ner_compress.core.artifacts import write_json
from ner_compress.core.runtime import cpuinfo_field
from ner_compress.deploy.backends import ort_session_options
from ner_compress.measure import timing

MS_DOMAIN = "com.microsoft"
LAYERS_PER_GRAPH = 4
REPEATS = 5  # passes over the workload per timing, the lowest kept (``workload_ms``)
EPSILON = 1e-12


@dataclass(frozen=True)
class Workload:
    """The inputs a latency is measured on: ``shapes`` (batch, tokens) per call over ``sentences`` sentences."""
    batch_size: int
    shapes: tuple
    sentences: int

    @classmethod
    def from_lengths(cls, lengths, batch_size):
        """Calls of ``batch_size`` windows of these token counts, length-sorted and padded to each call's longest."""
        ordered = sorted(lengths) if batch_size > 1 else list(lengths)
        calls = [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]
        return cls(batch_size, tuple((len(call), max(call)) for call in calls), len(ordered))

    @classmethod
    def from_feeds(cls, feeds, batch_size):
        """The shapes of model inputs as a tagger pads them (``window_scores.model_inputs``)."""
        shapes = tuple(tuple(int(d) for d in feed["input_ids"].shape) for feed in feeds)
        return cls(batch_size, shapes, sum(batch for batch, _ in shapes))


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    head_dim: int
    heads: int
    intermediate: int


def _tensor(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _weight(name, rng, *shape):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype("float32"), name)


def part_graph(shape, part, width, copies=LAYERS_PER_GRAPH, seed=0):
    """``copies`` stacked attention parts (``width`` heads) or FFN parts (``width`` neurons) of a layer."""
    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "x"
    for i in range(copies):
        out = f"layer{i}"
        pieces = _attention_part if part == "attention" else _ffn_part
        new_nodes, new_weights = pieces(shape, width, current, out, f"l{i}_", rng)
        nodes += new_nodes
        weights += new_weights
        current = out
    inputs = [_tensor("x", "batch", "tokens", shape.hidden)]
    if part == "attention":
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.INT32, ["batch", "tokens"]))
    graph = helper.make_graph(nodes, f"{part}_{width}", inputs, [_tensor(current, "batch", "tokens", shape.hidden)],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS_DOMAIN, 1)])


def _skip_norm(prefix, shape, rng, source, skip, out):
    weights = [numpy_helper.from_array(np.ones(shape.hidden, "float32"), prefix + "gamma"),
               numpy_helper.from_array(np.zeros(shape.hidden, "float32"), prefix + "beta"),
               _weight(prefix + "bias", rng, shape.hidden)]
    inputs = [source, skip, prefix + "gamma", prefix + "beta", prefix + "bias"]
    node = helper.make_node("SkipLayerNormalization", inputs,
                            [out], domain=MS_DOMAIN, epsilon=EPSILON)
    return node, weights


def _attention_part(shape, heads, source, out, prefix, rng):
    width = heads * shape.head_dim
    weights = [_weight(prefix + "qkv", rng, shape.hidden, 3 * width), _weight(prefix + "qkv_bias", rng, 3 * width),
               _weight(prefix + "out", rng, width, shape.hidden)]
    nodes = [helper.make_node("Attention", [source, prefix + "qkv", prefix + "qkv_bias", "keep"], [prefix + "ctx"],
                              domain=MS_DOMAIN, num_heads=heads),
             helper.make_node("MatMul", [prefix + "ctx", prefix + "out"], [prefix + "proj"])]
    norm, norm_weights = _skip_norm(prefix, shape, rng, prefix + "proj", source, out)
    return nodes + [norm], weights + norm_weights


def _ffn_part(shape, neurons, source, out, prefix, rng):
    weights = [_weight(prefix + "w1", rng, shape.hidden, neurons), _weight(prefix + "b1", rng, neurons),
               _weight(prefix + "w2", rng, neurons, shape.hidden)]
    nodes = [helper.make_node("MatMul", [source, prefix + "w1"], [prefix + "up"]),
             helper.make_node("BiasGelu", [prefix + "up", prefix + "b1"], [prefix + "act"], domain=MS_DOMAIN),
             helper.make_node("MatMul", [prefix + "act", prefix + "w2"], [prefix + "down"])]
    norm, norm_weights = _skip_norm(prefix, shape, rng, prefix + "down", source, out)
    return nodes + [norm], weights + norm_weights


def session(model, threads):
    """An ONNX Runtime CPU session on ``model`` (a path or serialized bytes), set up as the deployed tagger's."""
    import onnxruntime as ort

    options = ort_session_options(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def workload_ms(run, feeds, workload, repeats=REPEATS):
    """Milliseconds per sentence of ``run(feed)`` over every call of the workload: the lowest of ``repeats``
    passes. On a shared CPU other work only adds time, and the lowest of 5 passes scatters far less between
    runs than their median (at batch 1, medians of 3 passes of one graph ranged over 25%)."""
    def once():
        for feed in feeds:
            run(feed)
    return min(timing.repeat_seconds(once, repeats)) * 1000 / workload.sentences


def model_ms(onnx_path, feeds, workload, threads, repeats=REPEATS):
    """Milliseconds per sentence of a whole exported graph over the workload's real inputs."""
    sess = session(onnx_path, threads)
    return workload_ms(lambda feed: sess.run(None, feed), feeds, workload, repeats)


def part_ms(shape, part, width, workload, threads, repeats=REPEATS, precision="fp32"):
    """Milliseconds per sentence of one layer's ``part`` at ``width`` heads or neurons."""
    model = part_graph(shape, part, width)
    if precision == "int8":
        model = quantized(model)
    sess = session(model.SerializeToString(), threads)
    rng = np.random.default_rng(1)
    feeds = []
    for batch, tokens in workload.shapes:
        feed = {"x": rng.standard_normal((batch, tokens, shape.hidden)).astype("float32")}
        if part == "attention":
            feed["keep"] = np.ones((batch, tokens), "int32")
        feeds.append(feed)
    return workload_ms(lambda feed: sess.run(None, feed), feeds, workload, repeats) / LAYERS_PER_GRAPH


def quantized(model):
    """The INT8 copy ONNX Runtime's dynamic quantization makes of a part (QAttention, int8 MatMul weights)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, source)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
        return onnx.load(target)


@dataclass
class LatencyTable:
    """Milliseconds per sentence of one layer's attention part by heads and FFN part by neurons, plus the rest
    of the model (``rest_ms``), measured on ``machine`` for one workload."""
    machine: dict
    shape: dict
    attention_ms: dict = field(default_factory=dict)  # heads -> ms
    ffn_ms: dict = field(default_factory=dict)  # neurons -> ms
    rest_ms: float = 0.0

    def attention(self, heads):
        return _affine(self.attention_ms, heads)

    def ffn(self, neurons):
        return _affine(self.ffn_ms, neurons)

    def predict(self, heads, neurons):
        """Predicted milliseconds per sentence of a model whose layer i keeps heads[i] and neurons[i]."""
        return self.rest_ms + sum(self.attention(h) for h in heads) + sum(self.ffn(n) for n in neurons)

    def scaled(self, factor):
        """The table with every time multiplied by ``factor``: the machine as fast as it is now."""
        return LatencyTable(self.machine, self.shape, {k: v * factor for k, v in self.attention_ms.items()},
                            {k: v * factor for k, v in self.ffn_ms.items()}, self.rest_ms * factor)

    def to_json(self):
        return {**asdict(self), "attention_ms": {str(k): v for k, v in self.attention_ms.items()},
                "ffn_ms": {str(k): v for k, v in self.ffn_ms.items()}}

    @classmethod
    def from_json(cls, record):
        return cls(record["machine"], record["shape"], {int(k): v for k, v in record["attention_ms"].items()},
                   {int(k): v for k, v in record["ffn_ms"].items()}, record["rest_ms"])


def _affine(table, width):
    """The least-squares line through the measured widths, at ``width`` (0: a part removed costs nothing).

    Timings on a shared CPU scatter by 10-30% from one width to the next; on this machine a part's cost grows
    about linearly with its width, and a line through every point is steadier than any one point."""
    if width <= 0:
        return 0.0
    widths = np.array(sorted(table), dtype="float64")
    times = np.array([table[int(w)] for w in widths])
    slope, intercept = np.polyfit(widths, times, 1) if len(widths) > 1 else (0.0, times[0])
    if slope < 0:  # noise swamped the trend: a wider part is never cheaper, so take the mean
        slope, intercept = 0.0, float(times.mean())
    return float(intercept + slope * width)


def machine_key(threads, backend, precision, workload, shape):
    """What a table is valid for: measured again when any of it changes."""
    if backend == "paddle":
        import paddle as runtime_module
    else:
        import onnxruntime as runtime_module

    return {"cpu": cpuinfo_field("model name", platform.processor()), "cores": os.cpu_count(),
            "threads": threads, "backend": backend, "precision": precision, backend: runtime_module.__version__,
            "batch_size": workload.batch_size, "sentences": workload.sentences, "timing": f"lowest of {REPEATS}",
            "workload": hashlib.sha256(repr(workload.shapes).encode()).hexdigest()[:16], "shape": asdict(shape)}


def neuron_grid(intermediate, heads):
    """FFN widths the table is measured at, and the search chooses from: every 1/heads of the full width (the
    neurons of each uniform width) and the midpoints between them."""
    step = intermediate / heads
    return sorted({max(1, int(round(step * k / 2))) for k in range(1, 2 * heads + 1)})


def measured_points(values, most=8):
    """At most ``most`` widths of ``values`` to time, evenly spread and always the ends (the line needs few)."""
    index = np.unique(np.round(np.linspace(0, len(values) - 1, min(most, len(values)))).astype(int))
    return [values[i] for i in index]


def onnx_part_timer(shape, workload, threads, precision="fp32"):
    """``part_time(part, width)`` for ``measure_table``: ONNX Runtime's parts, each timed alone."""
    return lambda part, width: part_ms(shape, part, width, workload, threads, precision=precision)


def measure_table(shape, key, part_time, rest_ms_fn, log=None):
    """A new table for ``key`` (``machine_key``): ``part_time(part, width)`` at ``measured_points`` of the head
    counts 1..heads and of ``neuron_grid``; ``rest_ms_fn(table)`` gives the rest of the model."""
    table = LatencyTable(key, asdict(shape))
    for heads in measured_points(list(range(1, shape.heads + 1))):
        table.attention_ms[heads] = part_time("attention", heads)
    for neurons in measured_points(neuron_grid(shape.intermediate, shape.heads)):
        table.ffn_ms[neurons] = part_time("ffn", neurons)
    table.rest_ms = rest_ms_fn(table)
    if log:
        log.info("latency table: %d attention and %d FFN widths measured", len(table.attention_ms), len(table.ffn_ms))
    return table


def cached_table(path, key, measure):
    """The table at ``path`` if it was measured for ``key``, else ``measure()`` written there (atomically)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as cached:
            table = LatencyTable.from_json(json.load(cached))
        if table.machine == key:
            return table, True
    table = measure()
    write_json(path, table.to_json())
    return table, False
