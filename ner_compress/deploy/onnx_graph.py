"""paddle2onnx's BERT graph rewritten into the shape ONNX Runtime's transformer optimizer fuses.

paddle2onnx 1.2.11 differs from a torch BERT export in three places, each of which stops
``onnxruntime.transformers.fusion_attention`` (checked against onnxruntime 1.32's source):

1. every weight is a ``Constant`` node, not an initializer: the fusions read q/k/v weights and
   biases with ``get_initializer`` (Attention returns "not an initializer"; BiasGelu and the
   SkipLayerNorm bias never match);
2. the 1/sqrt(head_dim) scale multiplies Q *before* Q x K' (``MatMul(Mul(Q, c), K')``); the
   optimizer's qk paths are ``Softmax <- Add <- (Div|Mul) <- MatMul``, the scale *after* it (and a
   ``Mul`` there would be taken for the mask's ``Mul``, the first ``Mul`` parent of that ``Add``);
3. the mask is ``Unsqueeze(Mul(Cast(Equal(input_ids, pad)), -10000), [1, 2])``; the optimizer
   matches ``Mul(Sub(1, Cast(Unsqueeze(Unsqueeze(mask_2d)))), -10000)`` with a 2-D keep-mask.

paddle2onnx 2.x writes the same graph with two kinds of no-op between those nodes: an ``Identity`` on
most op outputs, and ``scale`` as ``Add(Mul(x, c), 0)``; ``drop_no_ops`` removes both first.

``rewrite_for_fusion`` makes those changes (the same arithmetic: the scale is a scalar, and
(1 - keep) x -10000 is pad x -10000); ``fuse`` then runs the optimizer with the model's heads and
q/k/v width and returns the counts per fused op type.
"""
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger("ner_compress")
# op types the benchmark reports (a standard BERT graph gets all but MultiHeadAttention on CPU)
FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu",
             "Gelu", "LayerNormalization")


class Graph:
    """Producer/consumer lookups over one ``onnx.GraphProto`` (rebuilt after each rewrite)."""

    def __init__(self, model):
        self.graph = model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.values = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}

    def parent(self, node, index, op_type):
        found = self.producer.get(node.input[index]) if index < len(node.input) else None
        return found if found is not None and found.op_type == op_type else None

    def only_child(self, node, op_type):
        children = self.consumers.get(node.output[0], [])
        return children[0] if len(children) == 1 and children[0].op_type == op_type else None

    def scalar(self, name):
        value = self.values.get(name)
        return float(value) if value is not None and value.size == 1 else None


def constants_to_initializers(model):
    """Every tensor-valued ``Constant`` node becomes an initializer of the same name."""
    keep = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            keep.append(node)
            continue
        value.name = node.output[0]
        model.graph.initializer.append(value)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(model.graph.initializer)


def drop_no_ops(model):
    """Remove every ``Identity`` and every ``Add`` of a scalar 0 (paddle2onnx 2.x's ``scale`` bias),
    reading their input wherever their output was read; returns how many were removed."""
    graph = Graph(model)
    outputs = {o.name for o in model.graph.output}
    renamed, keep = {}, []
    for node in model.graph.node:
        no_op = node.op_type == "Identity" or (node.op_type == "Add" and graph.scalar(node.input[1]) == 0.0)
        if no_op and node.output[0] not in outputs:
            renamed[node.output[0]] = renamed.get(node.input[0], node.input[0])
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(renamed)


def _add_initializer(model, name, array):
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def head_dim_of(graph, transpose):
    """head_dim from the ``Reshape`` to [0, 0, heads, head_dim] feeding ``transpose`` (None if not constant)."""
    reshape = graph.parent(transpose, 0, "Reshape")
    shape = graph.values.get(reshape.input[1]) if reshape is not None else None
    return int(shape[3]) if shape is not None and shape.size == 4 and shape[3] > 0 else None


def move_scale_after_qk(model):
    """``MatMul(Mul(Q, c), K')`` -> ``Div(MatMul(Q, K'), 1/c)`` where c == 1/sqrt(head_dim) (the scale
    the fused Attention applies itself), as torch exports BERT; returns how many were moved."""
    graph, moved = Graph(model), 0
    for matmul in list(model.graph.node):
        mul = graph.parent(matmul, 0, "Mul") if matmul.op_type == "MatMul" else None
        add = graph.only_child(matmul, "Add") if mul is not None else None
        if add is None or graph.only_child(add, "Softmax") is None or graph.only_child(mul, "MatMul") is None:
            continue
        q_transpose = graph.parent(mul, 0, "Transpose")
        scale = graph.scalar(mul.input[1])
        head_dim = head_dim_of(graph, q_transpose) if q_transpose is not None else None
        if scale is None or head_dim is None or not np.isclose(scale, head_dim ** -0.5, rtol=1e-6):
            continue
        scores = matmul.output[0]
        matmul.input[0] = mul.input[0]
        root = _add_initializer(model, scores + "/sqrt_head_dim", np.array(np.sqrt(head_dim), np.float32))
        div = helper.make_node("Div", [scores, root], [scores + "/scaled"])
        add.input[list(add.input).index(scores)] = div.output[0]
        model.graph.node.remove(mul)
        model.graph.node.insert(list(model.graph.node).index(matmul) + 1, div)
        moved += 1
    return moved


def standard_mask(model):
    """``Unsqueeze(Mul(Cast(Equal(ids, pad)), m), [1, 2])`` -> ``Mul(Sub(1, Cast(Unsqueeze(Unsqueeze(keep)))), m)``
    with keep = ``Cast(Not(Equal(ids, pad)), int32)``; returns how many masks were rewritten."""
    graph, rewritten = Graph(model), 0
    for unsqueeze in [n for n in model.graph.node if n.op_type == "Unsqueeze"]:
        mul = graph.parent(unsqueeze, 0, "Mul")
        cast = graph.parent(mul, 0, "Cast") if mul is not None else None
        equal = graph.parent(cast, 0, "Equal") if cast is not None else None
        axes = graph.values.get(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else None
        fill = graph.scalar(mul.input[1]) if mul is not None else None
        if equal is None or axes is None or list(axes) != [1, 2] or fill is None or fill >= 0:
            continue
        name = unsqueeze.output[0]
        one = _add_initializer(model, name + "/one", np.array(1.0, np.float32))
        fill_name = _add_initializer(model, name + "/fill", np.array(fill, np.float32))
        axis1 = _add_initializer(model, name + "/axis1", np.array([1], np.int64))
        axis2 = _add_initializer(model, name + "/axis2", np.array([2], np.int64))
        nodes = [
            helper.make_node("Not", [equal.output[0]], [name + "/keep_bool"]),
            helper.make_node("Cast", [name + "/keep_bool"], [name + "/keep"], to=TensorProto.INT32),
            helper.make_node("Unsqueeze", [name + "/keep", axis1], [name + "/keep3"]),
            helper.make_node("Unsqueeze", [name + "/keep3", axis2], [name + "/keep4"]),
            helper.make_node("Cast", [name + "/keep4"], [name + "/keep_float"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [one, name + "/keep_float"], [name + "/pad"]),
            helper.make_node("Mul", [name + "/pad", fill_name], [name]),
        ]
        at = list(model.graph.node).index(unsqueeze)
        for node in (unsqueeze, mul, cast):
            if node is not unsqueeze and len(graph.consumers.get(node.output[0], [])) > 1:
                continue  # still read elsewhere: leave it for onnx's dead-code pass below
            model.graph.node.remove(node)
        for offset, node in enumerate(nodes):
            model.graph.node.insert(min(at, len(model.graph.node)) + offset, node)
        rewritten += 1
    return rewritten


def rewrite_for_fusion(model):
    """The rewrites above, in place; returns what each changed (recorded in the manifest)."""
    initializers = constants_to_initializers(model)
    no_ops = drop_no_ops(model)
    return {"initializers": initializers, "no_ops_dropped": no_ops, "scales_moved": move_scale_after_qk(model),
            "masks_rewritten": standard_mask(model)}


def fusion_options():
    """The optimizer's BERT options, with the raw 2-D mask: ``MaskIndexEnd`` (the default) turns the
    mask into lengths, which is exact only while every [PAD] is at the end of its row."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    options = FusionOptions("bert")
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    return options


def fusion_sizes(plan):
    """``fuse``'s ``num_heads`` and ``attention_width`` for a ``WidthPlan``: a uniform plan's, or 0 and 0 when
    layers differ. The optimizer (``FusionAttention.get_num_heads_and_hidden_size``, onnxruntime 1.32) reads
    each layer's heads and head size from its Q ``Reshape`` to [0, 0, heads, head_dim] (a constant
    after ``rewrite_for_fusion``); the values given are only a fallback, and one layer's would be wrong for
    the others."""
    return (plan.heads, plan.attention_width) if plan.uniform else (0, 0)


def fuse(onnx_path, out_path, num_heads, attention_width):
    """Rewrite and optimize ``onnx_path`` into ``out_path``; returns ``{rewrites, fused: {op: count}}``.

    ``num_heads``/``attention_width``: heads kept and their q/k/v width (heads x head_dim, less than the
    hidden size in a width sub-model; 0 and 0: read per layer, ``fusion_sizes``). ``opt_level=0``: the
    optimizer's own ONNX Runtime pre-pass imports torch; the rewrites above do the constant folding it
    would have done."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(onnx_path)
    rewrites = rewrite_for_fusion(model)
    optimizer = optimize_model(model, model_type="bert", num_heads=num_heads, hidden_size=attention_width,
                               optimization_options=fusion_options(), opt_level=0)
    stats = optimizer.get_fused_operator_statistics()
    optimizer.save_model_to_file(out_path)
    return {"rewrites": rewrites, "fused": {op: int(stats.get(op, 0)) for op in FUSED_OPS}}
