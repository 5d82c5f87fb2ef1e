"""Resampling of the learned position embedding to another patch grid.

Two paths exist because released checkpoints were trained with two different
interpolations, and a model only reproduces its features with the one it was
trained with (REFERENCE §1.10):

* ``antialias`` (register models, timm, HF ``Dinov2WithRegisters``): resample
  to the target grid size with torch's antialiased bicubic (Keys a=-0.5, support
  widened when downsampling). ``jax.image.resize(..., 'cubic', antialias=True)``
  implements exactly that.
* ``legacy`` (original DINOv2 without registers, HF ``Dinov2Model``): torch's
  plain bicubic (Keys a=-0.75, clamped borders, ``align_corners=False``) driven
  by the scale factor ``(grid + offset) / M`` rather than the size.  jax has no
  such kernel, so it is built here as a small interpolation matrix per axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _keys_cubic(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel evaluated at distances ``t``."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def legacy_bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """[out_size, in_size] weights of torch's non-antialiased bicubic.

  torch maps output pixel ``i`` to source ``(i + 0.5) / scale - 0.5`` when
  called with ``scale_factor`` (it does not recompute the scale from sizes),
  takes the 4 taps around it with a=-0.75 and clamps tap indices to the border.
  """
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) / scale - 0.5
    base = int(np.floor(src))
    frac = src - base
    for tap in range(-1, 3):
      w = _keys_cubic(np.array(tap - frac), -0.75)
      weights[i, min(max(base + tap, 0), in_size - 1)] += w
  return weights.astype(np.float32)


def resample_patch_pos_embed(
    patch_pos: jax.Array,
    grid: tuple[int, int],
    *,
    antialias: bool = True,
    offset: float = 0.0,
) -> jax.Array:
  """Resamples ``patch_pos [M*M, D]`` (a square grid) to ``grid = (h, w)``.

  Computed in float32 like the references, whatever the param dtype.
  """
  n, dim = patch_pos.shape
  m = int(round(np.sqrt(n)))
  if m * m != n:
    raise ValueError(f'pos_embed has {n} patch positions, not a square grid')
  h, w = grid
  if (h, w) == (m, m):
    return patch_pos
  square = patch_pos.astype(jnp.float32).reshape(m, m, dim)
  if antialias or not offset:
    if not antialias:
      rows = legacy_bicubic_matrix(m, h, h / m)
      cols = legacy_bicubic_matrix(m, w, w / m)
      out = jnp.einsum('hi,wj,ijd->hwd', rows, cols, square,
                       precision=jax.lax.Precision.HIGHEST)
    else:
      out = jax.image.resize(square, (h, w, dim), 'cubic', antialias=True)
  else:
    scale_h, scale_w = (h + offset) / m, (w + offset) / m
    if int(np.floor(m * scale_h)) != h or int(np.floor(m * scale_w)) != w:
      raise ValueError(f'offset {offset} does not reproduce grid {grid} from {m}x{m}')
    rows = legacy_bicubic_matrix(m, h, scale_h)
    cols = legacy_bicubic_matrix(m, w, scale_w)
    out = jnp.einsum('hi,wj,ijd->hwd', rows, cols, square,
                     precision=jax.lax.Precision.HIGHEST)
  return out.reshape(h * w, dim).astype(patch_pos.dtype)
