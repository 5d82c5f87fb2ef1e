"""DINOv2's optimisation: its five schedules and its optimizer table (REFERENCE §3).

``DinoV2Schedules`` are ``build_schedulers`` of ``dinov2/train/train.py``
(lr, weight decay, teacher momentum, teacher temperature, last-layer lr);
``dinov2_groups`` is ``dinov2/utils/param_groups.py`` on our flax names, and
``dinov2_spec`` / ``dinov2_optimizer`` put both into the shared table-driven
optimizer (``train/optim.py``): AdamW, per-submodule clipping, layer decay.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax

from vitreg_jax.train.optim import (CLIP_EPS, OptimizerSpec, ParamGroup, build_optimizer,
                                    table_multipliers)
from vitreg_jax.train.schedules import cosine_schedule


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


def dinov2_groups(patch_embed_lr_mult: float = 0.2, freeze_last_layer_steps: int = 0,
                  backbone_key: str = 'backbone') -> tuple[ParamGroup, ...]:
  """DINOv2's table (``dinov2/utils/param_groups.py`` on our flax names).

  Tokens, kernels and the prototypes' ``weight_g`` / ``weight_v`` keep weight
  decay, as upstream; the heads' ``last_layer`` is frozen for
  ``freeze_last_layer_steps`` (upstream: ``freeze_last_layer_epochs`` epochs).
  """
  bb = re.escape(backbone_key)
  return (
      ParamGroup(rf'^{bb}/(.*/)?patch_embed(/|$)', lr_mult=patch_embed_lr_mult),
      ParamGroup(r'(^|/)bias$', wd_mult=0.0),       # reference name ends in '.bias'
      ParamGroup(r'norm|gamma', wd_mult=0.0),       # LayerNorms ('norm1', 'norm', ...), LayerScale
      ParamGroup(r'(^|/)last_layer(/|$)', frozen_steps=freeze_last_layer_steps),
  )


def param_multipliers(params, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                      backbone_key: str = 'backbone'):
  """DINOv2's ``(lr_mult, wd_mult, is_last_layer)`` trees matching ``params``.

  ``params`` is the student tree ``{backbone_key: vit_params, 'dino_head': ...,
  ['ibot_head': ...]}``, each as ``module.init(...)['params']``.
  """
  lr, wd, frozen = table_multipliers(params, dinov2_groups(patch_embed_lr_mult, 1, backbone_key),
                                     layerwise_decay, backbone_key)
  return lr, wd, jax.tree.map(lambda f: f > 0, frozen)


def dinov2_spec(schedules: DinoV2Schedules, layerwise_decay: float = 0.9,
                patch_embed_lr_mult: float = 0.2, clip_grad: float | None = 3.0,
                b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                backbone_key: str = 'backbone') -> OptimizerSpec:
  """DINOv2: AdamW, per-submodule clip, layer decay, ``dinov2_groups``, the schedules' lr / wd."""
  freeze = schedules.freeze_last_layer_epochs * schedules.epoch_length
  return OptimizerSpec(
      learning_rate=schedules.learning_rate, weight_decay=schedules.weight_decay_value,
      groups=dinov2_groups(patch_embed_lr_mult, freeze, backbone_key), kind='adamw',
      b1=b1, b2=b2, eps=eps, clip_grad=clip_grad, clip_by='submodule', clip_eps=CLIP_EPS,
      layerwise_decay=layerwise_decay, backbone_key=backbone_key)


def dinov2_optimizer(schedules: DinoV2Schedules, layerwise_decay: float = 0.9,
                     patch_embed_lr_mult: float = 0.2, clip_grad: float | None = 3.0,
                     b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                     backbone_key: str = 'backbone') -> optax.GradientTransformation:
  """``build_optimizer(dinov2_spec(...))``.

  Use on the student tree ``{backbone_key: ..., 'dino_head': ..., ['ibot_head': ...]}``;
  ``update(grads, state, params)`` needs ``params``. ``clip_grad`` of ``None``
  or 0 disables clipping, as ``optim.clip_grad`` does upstream.
  """
  return build_optimizer(dinov2_spec(schedules, layerwise_decay, patch_embed_lr_mult, clip_grad,
                                     b1, b2, eps, backbone_key))
