"""springfield's CPU kernels in oneDNN, called from jitted JAX code via XLA's FFI.

- :mod:`.conv`: 2-D convolutions (a drop-in for :func:`jax.lax.conv_general_dilated`) and
  whole conv + bias + ReLU + 2x2 average-pool blocks;
- :mod:`.depthwise`: depthwise convolutions (EfficientNet-Lite's);
- :mod:`.norm`: BatchNorm (+ ReLU), training and inference;
- :mod:`.dense`: dense layers' products in bfloat16;
- :mod:`.adam`: the fused Adam/AdamW update (:mod:`springfield.kernels.fused_adam`);
- :mod:`.library`: building, caching and loading the C++ library next to them.

Models and the train step never call these directly: :mod:`springfield.kernels` chooses
them (``--kernels``) and falls back to XLA's own implementations (:mod:`..xla`).
"""

from springfield.kernels.onednn.adam import adam_available, adam_update
from springfield.kernels.onednn.conv import (
    MIN_BF16_CHANNELS,
    conv_relu_pool,
    implementation,
    make_conv,
)
from springfield.kernels.onednn.dense import MIN_BF16_DENSE_WEIGHTS, make_dense_dot, matmul
from springfield.kernels.onednn.depthwise import make_depthwise
from springfield.kernels.onednn.library import available, bf16_supported, status
from springfield.kernels.onednn.norm import batch_norm, batch_norm_infer

__all__ = [
    "MIN_BF16_CHANNELS",
    "MIN_BF16_DENSE_WEIGHTS",
    "adam_available",
    "adam_update",
    "available",
    "batch_norm",
    "batch_norm_infer",
    "bf16_supported",
    "conv_relu_pool",
    "implementation",
    "make_conv",
    "make_dense_dot",
    "make_depthwise",
    "matmul",
    "status",
]
