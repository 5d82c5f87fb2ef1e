"""DINOv2 schedules as traceable functions of the step.

Each follows ``dinov2.utils.utils.CosineScheduler`` value for value: an
optional frozen prefix of zeros, a linear warmup ``linspace(start, base,
warmup)`` (so the last warmup step already reaches ``base``), then a cosine
from ``base`` to ``final`` over the remaining steps, and ``final`` from
``total_steps`` on. Steps count optimiser updates from 0 (the reference's
``iteration``).
"""

import math

import jax.numpy as jnp


def scaled_lr(base_lr: float, batch_size: int, reference_batch_size: int = 1024) -> float:
  """DINOv2's ``sqrt_wrt_1024`` rule: ``base_lr * sqrt(batch / 1024)`` (images per step)."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  return base_lr * math.sqrt(batch_size / reference_batch_size)


def cosine_schedule(step, base_value: float, final_value: float, total_steps: int,
                    warmup_steps: int = 0, start_warmup_value: float = 0.0,
                    freeze_steps: int = 0):
  """``CosineScheduler(...)[step]`` as a float32 jnp scalar (``step`` may be traced)."""
  cosine_steps = total_steps - warmup_steps - freeze_steps
  if min(total_steps, warmup_steps, freeze_steps, cosine_steps) < 0:
    raise ValueError(
        f'need 0 <= freeze_steps ({freeze_steps}) + warmup_steps ({warmup_steps}) '
        f'<= total_steps ({total_steps})')
  step = jnp.asarray(step, jnp.float32)
  warm_i = step - freeze_steps
  warm = start_warmup_value + (base_value - start_warmup_value) * warm_i / max(warmup_steps - 1, 1)
  cos_i = step - freeze_steps - warmup_steps
  # 0.5 * (1 + cos(pi * i / n)) == sin(pi / 2 * (n - i) / n)^2, which keeps full
  # float32 relative accuracy as the value approaches ``final`` (no cancellation).
  remaining = (cosine_steps - cos_i) / max(cosine_steps, 1)
  cosine = final_value + (base_value - final_value) * jnp.square(jnp.sin(0.5 * jnp.pi * remaining))
  value = jnp.where(step < freeze_steps + warmup_steps, warm, cosine)
  value = jnp.where(step < freeze_steps, 0.0, value)
  return jnp.where(step >= total_steps, final_value, value).astype(jnp.float32)
