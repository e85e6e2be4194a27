"""The encoder changes our configs record, applied to any family's token classifier after it is built:
a ``WidthPlan`` (heads and neurons each layer keeps), ``normalize_before`` (pre-LN), ``local_conv_kernel``
(a convolution after the embeddings). ``configure_encoder`` applies them.
"""
import types

import paddle
from paddle import nn



def encoder_layers(model):
    """The encoder layers inside a token classifier (``model.bert``, ``model.ernie``, ...)."""
    return model.base_model.encoder.layers


def configure_encoder(model, config, plan):
    """Apply the options our configs record and cut to ``plan``; called by every family's class after
    building it."""
    if getattr(config, "local_conv_kernel", 0):
        use_local_context(model, int(config.local_conv_kernel))
    if getattr(config, "normalize_before", False):
        use_pre_layer_norm(model)
    if not plan.full:
        shrink_encoder(model, plan)


def _linear(in_features, out_features):
    return nn.Linear(in_features, out_features)


def shrink_encoder(model, plan):
    """Cut each encoder layer to the heads and feed-forward neurons ``plan`` gives it."""
    hidden = model.config.hidden_size
    for layer, heads, width, neurons in zip(encoder_layers(model), plan.layer_heads, plan.attention_widths(),
                                            plan.layer_neurons):
        attn = layer.self_attn
        attn.num_heads = heads
        attn.q_proj = _linear(hidden, width)
        attn.k_proj = _linear(hidden, width)
        attn.v_proj = _linear(hidden, width)
        attn.out_proj = _linear(width, hidden)
        layer.linear1 = _linear(hidden, neurons)
        layer.linear2 = _linear(neurons, hidden)
    return model


def use_pre_layer_norm(model):
    """Pre-LN encoder: each layer normalises its input, and one LayerNorm closes the encoder.
    PaddleNLP's BERT is post-LN only; pre-LN trains stably at higher learning rates."""
    layers = encoder_layers(model)
    for layer in layers:
        layer.normalize_before = True
    model.base_model.encoder.norm = nn.LayerNorm(model.config.hidden_size, epsilon=layers[0].norm1._epsilon)
    return model


def use_local_context(model, kernel):
    """A residual 1-D convolution over ``kernel`` neighbouring characters after the embeddings.

    A transformer from random weights has no notion of locality and learns character n-grams
    slowly; the convolution gives it them from the first step. Padding is zeroed before it, so a
    sentence's scores do not depend on how far its batch was padded."""
    embeddings = model.base_model.embeddings
    channels = embeddings.layer_norm.weight.shape[0]  # ELECTRA: the embedding size
    embeddings.local_conv = nn.Conv1D(channels, channels, kernel, padding=kernel // 2)
    embeddings.local_pad_id = int(model.config.pad_token_id)
    embeddings.forward = types.MethodType(_local_context_forward, embeddings)
    return model


def _local_context_forward(self, input_ids=None, *args, **kwargs):
    hidden = type(self).forward(self, input_ids, *args, **kwargs)
    if input_ids is None:  # called with inputs_embeds: no ids to find padding by, every position counts
        keep = paddle.ones_like(hidden[:, :, :1])
    else:
        keep = (input_ids != self.local_pad_id).astype(hidden.dtype).unsqueeze(-1)
    # channels first: Paddle Inference's oneDNN conv mislays NLC outputs (2.6.2: LayerNorm shape error)
    context = self.local_conv((hidden * keep).transpose([0, 2, 1])).transpose([0, 2, 1])
    return hidden + context
