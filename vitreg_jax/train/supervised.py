"""Supervised classification: ViT + linear head, softmax cross-entropy, AdamW.

The first recipe on the shared sharding path, and the seed of DeiT-III. The
head reads the normed ``cls`` token (or the mean of the patch tokens with
``pool='mean'``); registers are never pooled. Weight decay skips biases,
norms, LayerScale gammas and the cls / register / position / mask tokens.

Config keys read (see ``configs/supervised.py``): ``model.*`` (``arch`` plus
``VisionTransformer`` field overrides, ``dtype`` as a string), ``num_classes``,
``pool``, ``label_smoothing``, ``input.image_size``, ``optimizer.*``,
``total_steps``.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vitreg_jax.models import layers
from vitreg_jax.models.build import backbone_from_config
from vitreg_jax.models.vit import VisionTransformer
from vitreg_jax.train import flops
from vitreg_jax.train.state import TrainState, unbox

POOLS = ('cls', 'mean')
NO_DECAY_PARAMS = ('bias', 'scale', 'gamma', 'cls_token', 'register_tokens', 'pos_embed',
                   'mask_token')


class ViTClassifier(nn.Module):
  """Backbone + ``head: Dense(embed -> classes)`` on the pooled token."""
  backbone: VisionTransformer
  num_classes: int
  pool: str = 'cls'

  @nn.compact
  def __call__(self, images, train: bool = False):
    out = self.backbone(images, train=train)
    if self.pool == 'cls':
      if 'cls' not in out:
        raise ValueError("pool='cls' needs a class token; use pool='mean'")
      features = out['cls']
    else:
      features = out['patches'].mean(axis=1)
    features = nn.with_logical_constraint(features, ('batch', 'embed'))
    logits = nn.Dense(self.num_classes, dtype=self.backbone.dtype,
                      kernel_init=layers.logical(layers.LINEAR_INIT, 'embed', 'classes'),
                      bias_init=layers.logical(nn.initializers.zeros, 'classes'),
                      name='head')(features)
    return logits.astype(jnp.float32)


def weight_decay_mask(params: Any) -> Any:
  """True for matrices that get weight decay (not biases, norms, gammas, tokens)."""
  def decays(path, leaf):
    name = getattr(path[-1], 'key', None)
    return leaf.ndim >= 2 and name not in NO_DECAY_PARAMS
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  opt = config.optimizer
  total = int(config.total_steps)
  warmup = int(opt.warmup_steps)
  if not 0 <= warmup < total:
    raise ValueError(f'optimizer.warmup_steps={warmup} must be in [0, total_steps={total})')
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=warmup, decay_steps=total,
      end_value=opt.end_lr)
  tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                   weight_decay=opt.weight_decay, mask=weight_decay_mask)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule


class SupervisedRecipe:
  """See ``vitreg_jax/train/recipes.py`` for the interface."""
  name = 'supervised'
  zero_metrics = ()
  batch_axes = {'images': ('batch', None, None, None), 'labels': ('batch',)}

  def __init__(self, config):
    if config.pool not in POOLS:
      raise ValueError(f'config.pool={config.pool!r}; valid: {POOLS}')
    self.config = config
    self.image_size = int(config.input.image_size)
    self.num_classes = int(config.num_classes)
    self.label_smoothing = float(config.label_smoothing)
    self.model = ViTClassifier(backbone_from_config(config.model), self.num_classes, config.pool)
    self.tx, self.schedule = make_optimizer(config)

  def init_state(self, rng: jax.Array) -> TrainState:
    images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    params = self.model.init({'params': rng}, images)['params']
    return TrainState.create(params=params, opt_state=self.tx.init(unbox(params)))

  def abstract_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    s = self.image_size
    return {'images': jax.ShapeDtypeStruct((global_batch_size, s, s, 3), jnp.float32),
            'labels': jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}

  def loss(self, params, batch, rng, train: bool = True):
    """Mean softmax cross-entropy over the global batch; also returns the logits."""
    logits = self.model.apply({'params': params}, batch['images'], train=train,
                              rngs={'dropout': rng})
    targets = optax.smooth_labels(jax.nn.one_hot(batch['labels'], self.num_classes),
                                  self.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean(), logits

  def train_step(self, state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, logits), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['labels']),
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': self.schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def analytic_flops(self, global_batch_size: int) -> float:
    backbone = self.model.backbone
    per_image = (flops.vit_forward_flops(backbone, (self.image_size, self.image_size))
                 + flops.dense_flops(backbone.embed_dim, self.num_classes))
    return flops.TRAIN_FORWARD_MULTIPLIER * per_image * global_batch_size


def make_recipe(config) -> SupervisedRecipe:
  return SupervisedRecipe(config)
