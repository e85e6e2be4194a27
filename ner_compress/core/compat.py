"""Workarounds for defects in the supported stacks, each applied once, here, and only where needed.

Two stacks are supported: Paddle 3.3.x (requirements.txt, the default) and Paddle 2.6.2
(requirements-paddle2.txt), both with PaddleSlim 2.6.0, whose last release predates Paddle 3.
Each patch in ``PATCHES`` names the versions it mends; ``apply_patches`` applies those the
running stack needs. Import this module before anything imports paddle (``ner_compress/__init__``
does). Every patch has a test in tests/test_compat.py that shows the defect, then the fix. It imports
paddle only inside the patches: the ONNX Runtime deploy install (requirements-serve.txt) has none.
"""
import contextlib
import functools
import os
import zlib
from importlib import metadata
from typing import Callable, NamedTuple


def installed_version(*distributions):
    """The version of the first of ``distributions`` that is installed, else ``None`` (read without importing)."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def major(version):
    return int(version.split(".")[0]) if version else None


PADDLE_VERSION = installed_version("paddlepaddle", "paddlepaddle-gpu")
PADDLESLIM_VERSION = installed_version("paddleslim")
PADDLE2ONNX_VERSION = installed_version("paddle2onnx")

# paddlepaddle 2.6.2 only (3.3.1 does not): libpaddle.so exports its own zlib ``inflate*``
# symbols. Python's zlib module binds them lazily, so the first inflate after ``import paddle``
# can land in paddle's copy and fail with "zlib.error: inconsistent stream state" (seen importing
# aiohttp and scipy through paddlenlp). One round trip before paddle loads binds the system zlib.
ZLIB_CLASH = major(PADDLE_VERSION) == 2
if ZLIB_CLASH:
    zlib.decompress(zlib.compress(b"ner_compress"))


class Patch(NamedTuple):
    name: str
    mends: str  # the upstream versions it targets, as a test's skip reason quotes them
    needed: Callable[[], bool]  # from the installed versions
    apply: Callable[[], None]


def on_paddleslim_2_6(paddle_major=None):
    """PaddleSlim 2.6.0 is installed (on Paddle ``paddle_major``, any when ``None``)."""
    return PADDLESLIM_VERSION == "2.6.0" and paddle_major in (None, major(PADDLE_VERSION))


# --- paddleslim 2.6.0 on paddle 2.6.2 and 3.3.x: SuperLayerNorm.forward --------------------------

def superlayernorm_forward(self, input):
    """``SuperLayerNorm.forward`` of PaddleSlim 2.6.0, fixed for Paddle 2.6.2 and 3.3.x.

    Upstream unpacks three outputs from ``paddle._C_ops.layer_norm``, which returns a
    single tensor on both: the unpacking runs along the batch axis, so any OFA forward raises
    ``ValueError`` (too many / not enough values to unpack), and a batch of exactly 3 would
    silently yield one row. The public functional API computes the same thing.
    """
    import paddle.nn.functional as F

    feature_dim = int(input.shape[-1])
    weight = self.weight[:feature_dim] if self._weight_attr is not False else None
    bias = self.bias[:feature_dim] if self._bias_attr is not False else None
    self.cur_config = {"prune_dim": feature_dim}
    return F.layer_norm(input, [feature_dim], weight=weight, bias=bias, epsilon=self._epsilon)


def patch_superlayernorm_forward():
    from paddleslim.nas.ofa.layers import SuperLayerNorm

    SuperLayerNorm.forward = superlayernorm_forward


# --- paddleslim 2.6.0 on paddle 3.x: constructors ---------------------------------------------

def superembedding_init(self, num_embeddings, embedding_dim, candidate_config={}, padding_idx=None,  # noqa: B006
                        sparse=False, weight_attr=None, name=None):
    """``SuperEmbedding.__init__`` of PaddleSlim 2.6.0 passing ``nn.Embedding``'s options by keyword:
    Paddle 3 put ``max_norm, norm_type`` after ``padding_idx`` and made the rest keyword-only, so
    upstream's positional call raises ``TypeError`` in ``Convert``."""
    import paddle

    paddle.nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx=padding_idx, sparse=sparse,
                                 weight_attr=weight_attr, name=name)
    self.candidate_config = candidate_config
    self.cur_config = None
    self.expand_ratio = candidate_config.get("expand_ratio")
    self.base_output_dim = self._embedding_dim
    if self.expand_ratio is not None:
        self.base_output_dim = int(self._embedding_dim / max(self.expand_ratio))


def superlayernorm_init(self, normalized_shape, epsilon=1e-05, weight_attr=None, bias_attr=None, name=None):
    """``SuperLayerNorm.__init__`` of PaddleSlim 2.6.0 with ``weight_attr``, ``bias_attr`` and
    ``name`` by keyword (keyword-only in Paddle 3's ``nn.LayerNorm``)."""
    import paddle

    paddle.nn.LayerNorm.__init__(self, normalized_shape, epsilon, weight_attr=weight_attr, bias_attr=bias_attr,
                                 name=name)
    self.cur_config = None


def patch_super_constructors():
    from paddleslim.nas.ofa.layers import SuperEmbedding, SuperLayerNorm

    SuperEmbedding.__init__ = superembedding_init
    SuperLayerNorm.__init__ = superlayernorm_init


# Not patched (PaddleSlim 2.6.0 on Paddle 3.x): OFA's first forward without a ``net_config`` traces
# the model through ``paddle.base.dygraph.base._to_static_mode_guard_`` (renamed) into a PIR program
# that ``GraphWrapper`` cannot read; only ``FLAGS_enable_pir_api=0`` before paddle loads avoids it,
# and that would make export write the old format. ``supernet.set_width`` always sets a
# ``net_config`` first, so that trace never runs here (tests/test_compat.py shows both).


# --- paddle2onnx 2.x: Polygraphy's pip auto-install ------------------------------------------

POLYGRAPHY_AUTOINSTALL_LEAK = major(PADDLE2ONNX_VERSION) == 2  # 1.2.11 does not use Polygraphy


@contextlib.contextmanager
def polygraphy_without_installs():
    """Around ``paddle2onnx.export``: paddle2onnx 2.1.0 sets ``POLYGRAPHY_AUTOINSTALL_DEPS=1`` for the
    whole process before folding constants with Polygraphy, whose lazy imports then ``pip install``
    whatever they miss or find older than they like (here: onnx_graphsurgeon, ml_dtypes, and numpy
    upgraded past onnxruntime's build). Inside this block Polygraphy installs nothing (the pins in
    requirements.txt give it what it needs), and afterwards the variable is as it was before."""
    if not POLYGRAPHY_AUTOINSTALL_LEAK:
        yield
        return
    from polygraphy import config

    before = os.environ.get("POLYGRAPHY_AUTOINSTALL_DEPS")
    config.AUTOINSTALL_DEPS = False  # read from the environment once, when polygraphy is imported
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("POLYGRAPHY_AUTOINSTALL_DEPS", None)
        else:
            os.environ["POLYGRAPHY_AUTOINSTALL_DEPS"] = before


# --- paddle 2.6.2 and 3.3.1: LayerNorm's input gradient when its scale needs none ------------

# ``layer_norm``'s backward leaves the scale out of the input's gradient when the scale has
# ``stop_gradient`` set: wrong by the scale per channel (seen on 2.6.2 and 3.3.1; tests/test_compat.py
# checks it against finite differences). A model frozen to take gradients of masks only must keep its
# LayerNorm scales live; they are a few hundred numbers a layer, so that costs nothing.
LAYER_NORM_FROZEN_SCALE = major(PADDLE_VERSION) in (2, 3)


@contextlib.contextmanager
def weights_frozen(model):
    """Inside the block ``model``'s weights take no gradient (a backward for masks or inputs only does a third
    less work), but for LayerNorm scales where ``LAYER_NORM_FROZEN_SCALE``; every flag is restored after."""
    import paddle

    live = set()
    if LAYER_NORM_FROZEN_SCALE:
        live = {id(sub.weight) for sub in model.sublayers(include_self=True)
                if isinstance(sub, paddle.nn.LayerNorm) and sub.weight is not None}
    params = model.parameters()
    before = [p.stop_gradient for p in params]
    try:
        for p in params:
            p.stop_gradient = id(p) not in live
        yield
    finally:
        for p, flag in zip(params, before):
            p.stop_gradient = flag


PATCHES = (
    Patch("superlayernorm_forward", "paddleslim 2.6.0 on paddle 2.6.x and 3.x", on_paddleslim_2_6,
          patch_superlayernorm_forward),
    Patch("super_constructors", "paddleslim 2.6.0 on paddle 3.x", functools.partial(on_paddleslim_2_6, 3),
          patch_super_constructors),
)
APPLIED = set()


def patch_named(name):
    return next(p for p in PATCHES if p.name == name)


def apply_patches():
    """Patch the installed PaddleSlim in place where this stack needs it; safe to call more than once."""
    for patch in PATCHES:
        if patch.name not in APPLIED and patch.needed():
            patch.apply()
            APPLIED.add(patch.name)
    return sorted(APPLIED)
