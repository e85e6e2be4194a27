"""The latency table for Paddle Inference (``tools/search.py --backend paddle``).

ONNX Runtime's parts can be timed alone (``latency_table.part_graph``); Paddle Inference's fusion passes
rewrite a whole layer (oneDNN fc, fused attention), so here a part is timed inside layers of the teacher's own
family, exported as the tagger's static graph and run by the tagger's predictor (oneDNN on, the deploy
settings): stacks of ``LAYERS_PER_GRAPH`` layers with random weights, one part cut to a measured width and
the other whole. A part's cost at a width is its stack's difference to the whole stack, per layer, plus half a
whole layer (whole layer: the difference between a ``LAYERS_PER_GRAPH``-layer and a one-layer stack). How a
whole layer is split between the parts cancels out of every prediction, as plans keep at least one head and
one neuron a layer; what the layers do not cost is the teacher's measured latency minus its layers.
"""
import copy
import os
import tempfile

from ner_compress.deploy.export import save_static
from ner_compress.deploy.inference import read_meta
from ner_compress.deploy.paddle_inference import StaticTagger
from ner_compress.measure import latency_table as lt
from ner_compress.models.families import load_config, model_class_for
from ner_compress.models.width_plan import layer_plan


def static_ms(static_dir, feeds, workload, threads, repeats=lt.REPEATS):
    """Milliseconds per sentence of an exported static graph through the tagger's predictor, over the workload."""
    tagger = StaticTagger(static_dir, threads=threads)
    return lt.workload_ms(lambda feed: tagger.logits(feed["input_ids"], feed["token_type_ids"]), feeds, workload,
                          repeats)


class StackTimer:
    """Part costs from whole-stack timings: ``stack_ms(layers, heads, neurons)`` with every layer alike."""

    def __init__(self, stack_ms, heads, neurons):
        self.stack_ms, self.heads, self.neurons = stack_ms, heads, neurons
        self.whole_stack = stack_ms(lt.LAYERS_PER_GRAPH, heads, neurons)
        self.whole_layer = (self.whole_stack - stack_ms(1, heads, neurons)) / (lt.LAYERS_PER_GRAPH - 1)

    def part_ms(self, part, width):
        """``latency_table.measure_table``'s ``part_time``."""
        heads, neurons = (width, self.neurons) if part == "attention" else (self.heads, width)
        whole = (heads, neurons) == (self.heads, self.neurons)  # the stack already timed: not exported again
        stack = self.whole_stack if whole else self.stack_ms(lt.LAYERS_PER_GRAPH, heads, neurons)
        return (stack - self.whole_stack) / lt.LAYERS_PER_GRAPH + self.whole_layer / 2


def part_timer(teacher_dir, static_dir, feeds, workload, threads):
    """``part_time(part, width)`` from stacks of the family of ``teacher_dir`` (random weights; vocabulary and
    labels of ``static_dir``, the teacher's export) exported and timed on ``feeds``."""
    config = load_config(teacher_dir, "teacher")
    meta = read_meta(static_dir)

    def stack_ms(layers, heads, neurons):
        stack = copy.deepcopy(config)
        stack.num_hidden_layers = layers
        model = model_class_for(teacher_dir, "teacher")(stack, plan=layer_plan(stack, [heads] * layers,
                                                                               [neurons] * layers))
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_static(model, tmp, meta["labels"], meta["max_seq_length"], os.path.join(static_dir, "vocab.txt"))
            return static_ms(tmp, feeds, workload, threads)

    return StackTimer(stack_ms, int(config.num_attention_heads), int(config.intermediate_size)).part_ms
