"""Workarounds for defects in the pinned stack, each applied once, here.

Import this module before anything imports paddle (``ner_compress/__init__`` does).
Every fix names the upstream version it targets and has a test in tests/test_compat.py.
"""
import zlib

# paddlepaddle 2.6.2: libpaddle.so exports its own zlib ``inflate*`` symbols. Python's
# zlib module binds them lazily, so the first inflate after ``import paddle`` can land in
# paddle's copy and fail with "zlib.error: inconsistent stream state" (seen importing
# aiohttp and scipy through paddlenlp). One round trip before paddle loads binds the
# system zlib for good.
zlib.decompress(zlib.compress(b"ner_compress"))

import paddle  # noqa: E402,F401  (loads libpaddle after the zlib round trip)
import paddle.nn.functional as F  # noqa: E402

_PATCHED = False


def superlayernorm_forward(self, input):
    """``SuperLayerNorm.forward`` of PaddleSlim 2.6.0, fixed for Paddle 2.6.2.

    Upstream unpacks three outputs from ``paddle._C_ops.layer_norm``, which returns a
    single tensor on Paddle 2.6.x: the unpacking runs along the batch axis, so any OFA
    forward raises ``ValueError`` (too many / not enough values to unpack), and a batch of
    exactly 3 would silently yield one row. The public functional API computes the same thing.
    """
    feature_dim = int(input.shape[-1])
    weight = self.weight[:feature_dim] if self._weight_attr is not False else None
    bias = self.bias[:feature_dim] if self._bias_attr is not False else None
    self.cur_config = {"prune_dim": feature_dim}
    return F.layer_norm(input, [feature_dim], weight=weight, bias=bias, epsilon=self._epsilon)


def apply_patches():
    """Patch PaddleSlim 2.6.0 in place; safe to call more than once."""
    global _PATCHED
    if _PATCHED:
        return
    from paddleslim.nas.ofa.layers import SuperLayerNorm

    SuperLayerNorm.forward = superlayernorm_forward
    _PATCHED = True
