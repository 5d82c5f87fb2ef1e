"""DINOv2 schedules as traceable functions of the step.

Each follows ``dinov2.utils.utils.CosineScheduler`` value for value: an
optional frozen prefix of zeros, a linear warmup ``linspace(start, base,
warmup)`` (so the last warmup step already reaches ``base``), then a cosine
from ``base`` to ``final`` over the remaining steps, and ``final`` from
``total_steps`` on. Steps count optimiser updates from 0 (the reference's
``iteration``).
"""

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class DinoV2Schedules:
  """The five schedules of DINOv2's ``build_schedulers`` (ssl_default_config values).

  ``lr`` is the peak learning rate after batch scaling (see ``scaled_lr``).
  Lengths are in epochs of ``epoch_length`` steps (upstream: 1250).
  """
  lr: float
  epochs: int = 100
  epoch_length: int = 1250
  warmup_epochs: int = 10
  min_lr: float = 1e-6
  weight_decay: float = 0.04
  weight_decay_end: float = 0.4
  momentum_teacher: float = 0.992
  final_momentum_teacher: float = 1.0
  warmup_teacher_temp: float = 0.04
  teacher_temp: float = 0.07
  warmup_teacher_temp_epochs: int = 30
  freeze_last_layer_epochs: int = 1

  def __post_init__(self):
    for name in ('epochs', 'epoch_length'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if not 0 <= self.warmup_epochs <= self.epochs:
      raise ValueError(f'warmup_epochs={self.warmup_epochs} must lie in [0, epochs={self.epochs}]')
    for name in ('warmup_teacher_temp_epochs', 'freeze_last_layer_epochs'):
      if getattr(self, name) < 0:  # independent of `epochs` upstream
        raise ValueError(f'{name}={getattr(self, name)} must be >= 0')

  @property
  def total_steps(self) -> int:
    return self.epochs * self.epoch_length

  def learning_rate(self, step):
    return cosine_schedule(step, self.lr, self.min_lr, self.total_steps,
                           warmup_steps=self.warmup_epochs * self.epoch_length)

  def last_layer_learning_rate(self, step):
    """The lr schedule with the first ``freeze_last_layer_epochs`` set to 0."""
    frozen = jnp.asarray(step) < self.freeze_last_layer_epochs * self.epoch_length
    return jnp.where(frozen, 0.0, self.learning_rate(step)).astype(jnp.float32)

  def weight_decay_value(self, step):
    return cosine_schedule(step, self.weight_decay, self.weight_decay_end, self.total_steps)

  def teacher_momentum(self, step):
    return cosine_schedule(step, self.momentum_teacher, self.final_momentum_teacher,
                           self.total_steps)

  def teacher_temperature(self, step):
    """Linear ``warmup_teacher_temp -> teacher_temp`` over the warmup epochs, then constant."""
    warm = self.warmup_teacher_temp_epochs * self.epoch_length
    return cosine_schedule(step, self.teacher_temp, self.teacher_temp, warm,
                           warmup_steps=warm, start_warmup_value=self.warmup_teacher_temp)

  def all(self, step) -> dict:
    """Every schedule at ``step``, for logging."""
    return dict(lr=self.learning_rate(step), last_layer_lr=self.last_layer_learning_rate(step),
                wd=self.weight_decay_value(step), momentum=self.teacher_momentum(step),
                teacher_temp=self.teacher_temperature(step))
