"""MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021): ``--mixstyle P``.

A convolutional network's early feature maps carry an image's style (palette, contrast,
texture) in their per-image, per-channel means and standard deviations, and its content in
the normalised maps. MixStyle swaps part of the style between the images of a batch during
training: each image's early features are normalised by their own statistics and re-scaled
by a random blend of its own and another image's. The network cannot then rely on one
source's look (the show's frames, Maggie's web pictures), which helps on drawings in other
styles. It costs a few elementwise passes over the first stages' activations and nothing at
inference, where it is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from springfield.parallel import take_rows

# The paper's settings: Beta(0.1, 0.1) puts most blends near one image or the other, and the
# statistics are treated as constants in the backward pass.
ALPHA = 0.1
EPS = 1e-6


def mix_style(x: jax.Array, key: jax.Array, chance: float, alpha: float = ALPHA) -> jax.Array:
    """``x`` (NHWC) with its per-image channel statistics blended with those of a random
    other image of the batch, in a batch picked with probability ``chance``; otherwise ``x``
    unchanged. Statistics are computed in float32; the result has ``x``'s dtype."""
    k_coin, k_lam, k_perm = jax.random.split(key, 3)
    xf = x.astype(jnp.float32)
    mu = jax.lax.stop_gradient(jnp.mean(xf, axis=(1, 2), keepdims=True))
    sig = jax.lax.stop_gradient(jnp.sqrt(jnp.var(xf, axis=(1, 2), keepdims=True) + EPS))
    lam = jax.random.beta(k_lam, alpha, alpha, (x.shape[0], 1, 1, 1))
    perm = jax.random.permutation(k_perm, x.shape[0])
    # The partner's statistics travel between devices, not its images.
    mu_mix = lam * mu + (1 - lam) * take_rows(mu, perm)
    sig_mix = lam * sig + (1 - lam) * take_rows(sig, perm)
    mixed = ((xf - mu) / sig * sig_mix + mu_mix).astype(x.dtype)
    return jnp.where(jax.random.bernoulli(k_coin, chance), mixed, x)
