"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
version 0.1 with the AlexNet trunk: the perceptual distance StoryDiffusion's Table 2 reports.

    d(x, y) = sum over taps k of  mean over (h, w) of  w_k . (n(F_k(x)) - n(F_k(y)))**2

x, y: RGB in [-1, 1], first shifted and scaled per channel (the `ScalingLayer`); F_k: the ReLU outputs
of AlexNet's five convolutions (64/192/384/256/256 channels); n: unit length over channels (eps 1e-10
added to the norm); w_k: the learned non-negative 1x1 "linear head" of tap k (no bias).

The trunk mirrors torchvision's `alexnet().features` (its `features.{0,3,6,8,10}` convolutions; the
classifier is not used), the heads the `lpips` package's `lin{k}`, so `convert/metrics.py` maps both
files by name. The distance splits into `features` (once per image) and `distance` (per pair): a video's
frames are each run through the trunk once, however many pairs they are compared in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..nn.layers import Conv

# lpips' ScalingLayer: inputs in [-1, 1] are mapped to roughly ImageNet-normalised values.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAP_CHANNELS = (64, 192, 384, 256, 256)
# torchvision alexnet().features: (index, in, out, kernel, stride, padding), each followed by a ReLU (the
# tap); a 3x3 stride-2 max pool follows the ReLUs of convolutions 0 and 3.
_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
          (10, 256, 256, 3, 1, 1))
_POOL_AFTER = (0, 3)
EPS = 1e-10
# Smallest side AlexNet's two pools leave a non-empty map for (conv 11/4 then two 3/2 pools).
MIN_SIDE = 32


def _max_pool(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(kernel_size=3, stride=2): no padding, floor mode."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class AlexNetFeatures(nnx.Module):
    def __init__(self, *, dtype, rngs: nnx.Rngs | None = None):
        # A dict keyed by torchvision's Sequential indices, so parameter paths read `features.3.kernel`.
        self.features = nnx.Dict({str(i): Conv(cin, cout, k, s, padding=((p, p), (p, p)), dtype=dtype,
                                               param_dtype=dtype)
                                  for i, cin, cout, k, s, p in _CONVS})

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """NHWC -> the five ReLU outputs."""
        taps = []
        for i, *_ in _CONVS:
            x = jax.nn.relu(self.features[str(i)](x))
            taps.append(x)
            if i in _POOL_AFTER:
                x = _max_pool(x)
        return taps


class LPIPS(nnx.Module):
    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.net = AlexNetFeatures(dtype=dtype)
        for k, c in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{k}", Conv(c, 1, 1, use_bias=False, dtype=dtype, param_dtype=dtype))

    def features(self, images: jax.Array) -> list[jax.Array]:
        """[B, H, W, 3] RGB in [-1, 1] -> per tap [B, h, w, C] channel-normalised features."""
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        taps = self.net((images.astype(jnp.float32) - shift) / scale)
        out = []
        for t in taps:
            t = t.astype(jnp.float32)
            out.append(t / (jnp.sqrt(jnp.sum(t * t, axis=-1, keepdims=True)) + EPS))
        return out

    def distance(self, a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
        """Two lists of `features` outputs -> [B] LPIPS distances."""
        total = 0.0
        for k, (fa, fb) in enumerate(zip(a, b)):
            head = getattr(self, f"lin{k}")
            total = total + jnp.mean(head(jnp.square(fa - fb))[..., 0], axis=(1, 2))
        return total

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """[B, H, W, 3] pairs in [-1, 1] -> [B] distances."""
        return self.distance(self.features(x), self.features(y))
