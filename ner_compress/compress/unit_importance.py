"""Fisher information of every attention head and FFN neuron (Kwon et al. 2022, "A Fast Post-Training Pruning
Framework for Transformers"): how much the loss on training sentences rises, to second order, when a unit is
masked; the sum over batches of the squared gradient of the loss with respect to a mask of ones on the unit's
output. Unlike a per-layer ranking, the values are comparable across layers and between heads and neurons,
which is what a per-layer width search needs. ``reorder_by_importance`` then puts each layer's best units
first, so a plan keeping k heads of a layer keeps its k most important (the leading slice, as supernets do).
"""
import numpy as np
import paddle
from paddlenlp.transformers.ofa_utils import reorder_head, reorder_neuron

from ner_compress.compress.training import token_loss
from ner_compress.core.compat import weights_frozen
from ner_compress.models.encoder_changes import encoder_layers


def _masked_heads(mask, heads):
    def hook(layer, inputs):
        context = inputs[0]
        shape = context.shape
        per_head = context.reshape([shape[0], shape[1], heads, -1]) * mask.reshape([1, 1, heads, 1])
        return (per_head.reshape(shape),) + tuple(inputs[1:])
    return hook


def _masked_neurons(mask):
    def hook(layer, inputs):
        return (inputs[0] * mask,) + tuple(inputs[1:])
    return hook


def unit_masks(layers):
    """A mask of ones on every layer's heads (the context before the output projection) and FFN neurons (the
    activations before the second linear), multiplied in by forward pre-hooks: (head masks, neuron masks,
    hooks to remove)."""
    head_masks = [_ones(layer.self_attn.num_heads) for layer in layers]
    neuron_masks = [_ones(layer.linear2.weight.shape[0]) for layer in layers]
    hooks = [layer.self_attn.out_proj.register_forward_pre_hook(_masked_heads(mask, layer.self_attn.num_heads))
             for layer, mask in zip(layers, head_masks)]
    hooks += [layer.linear2.register_forward_pre_hook(_masked_neurons(mask))
              for layer, mask in zip(layers, neuron_masks)]
    return head_masks, neuron_masks, hooks


def fisher_importance(model, batches):
    """(heads [layers, heads], neurons [layers, neurons]) numpy Fisher information over ``batches`` (collated
    training batches as tensors, labels included)."""
    layers = encoder_layers(model)
    head_masks, neuron_masks, hooks = unit_masks(layers)
    heads = np.zeros((len(layers), head_masks[0].shape[0]))
    neurons = np.zeros((len(layers), neuron_masks[0].shape[0]))
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it will run
    try:
        with weights_frozen(model):  # only the masks' gradients are read
            for batch in batches:
                logits = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
                token_loss(logits, batch["labels"]).backward()
                heads += np.stack([mask.grad.numpy() ** 2 for mask in head_masks])
                neurons += np.stack([mask.grad.numpy() ** 2 for mask in neuron_masks])
                for mask in head_masks + neuron_masks:
                    mask.clear_gradient()
                model.clear_gradients()
    finally:
        for hook in hooks:
            hook.remove()
        model.train() if was_training else model.eval()  # Paddle 2.6 train() takes no flag
    return heads, neurons


def _ones(size):
    mask = paddle.ones([size], dtype="float32")
    mask.stop_gradient = False  # its gradient is what Fisher information is made of
    return mask


def reorder_by_importance(model, heads, neurons):
    """Each layer's heads and neurons sorted most important first (in place); the importances in that order."""
    head_order = np.argsort(-heads, axis=1, kind="stable")
    neuron_order = np.argsort(-neurons, axis=1, kind="stable")
    with paddle.no_grad():
        for layer, h_idx, n_idx in zip(encoder_layers(model), head_order, neuron_order):
            reorder_head(layer.self_attn, paddle.to_tensor(h_idx))
            reorder_neuron(layer.linear1, paddle.to_tensor(n_idx), dim=1)
            reorder_neuron(layer.linear2, paddle.to_tensor(n_idx), dim=0)
    return np.take_along_axis(heads, head_order, 1), np.take_along_axis(neurons, neuron_order, 1)
