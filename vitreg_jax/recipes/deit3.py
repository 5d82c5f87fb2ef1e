"""DeiT-III (+registers): supervised ViT training, the paper's third model (REFERENCE §8).

"DeiT III: Revenge of the ViT" trains a plain ViT (LayerScale, constant drop
path) with 3-Augment, Mixup/CutMix and LAMB. The registers paper trains
DeiT-III ViT-B on ImageNet-21k with and without 4 registers.

One step: the backbone + linear head on the normed cls token sees the mixed
images; the loss is soft-target cross-entropy (IN-21k recipe: CutMix, label
smoothing 0.1) or binary cross-entropy on binarised mixed targets (IN-1k
recipe: Mixup + CutMix); then the optimizer table (``train/optim.py``): LAMB
with apex's semantics, no weight decay on 1-D params, pos_embed, cls and
register tokens. Augmentation and mixing run on the host
(``data/three_augment.py``, ``data/mixing.py``), per process batch, as deit
does per GPU.

Departures from deit, all small: the lr follows warmup + cosine per step
(timm's scheduler steps per epoch); our ``pos_embed`` keeps a cls entry (its
sum with ``cls_token`` is what timm's ``no_embed_class`` cls token holds, so
exports are exact); repeated augmentation (x3 in the IN-1k recipe) is not
implemented; model EMA is not kept (deit's is only an extra copy).

Config keys: ``model.*``, ``classifier.*`` (num_classes, pool, loss),
``augment.*`` (image_size, spatial, crop_scale, color_jitter, eval crop),
``mixing.*``, the shared ``optim.*`` (``configs/deit3_reg.py``).
"""

import jax
import jax.numpy as jnp
import optax

from vitreg_jax import config as config_lib
from vitreg_jax.data.mixing import MixupCutmix
from vitreg_jax.data.pipeline import section
from vitreg_jax.data.three_augment import ThreeAugment
from vitreg_jax.data import transforms
from vitreg_jax.evals.classification import ClassificationEvaluator
from vitreg_jax.losses import classification
from vitreg_jax.models.build import backbone_from_config
from vitreg_jax.models.heads import ViTClassifier
from vitreg_jax.train import flops, optim
from vitreg_jax.train.optim import OptimizerSpec, ParamGroup, Schedule
from vitreg_jax.train.recipe import BatchField, Export
from vitreg_jax.train.state import TrainState, unbox

SECTIONS = ('model', 'classifier', 'augment', 'mixing', 'schedule', 'variant')
CLASSIFIER = {'num_classes': 1000, 'pool': 'cls', 'loss': 'bce'}
AUGMENT = {'image_size': 224, 'spatial': 'src', 'crop_scale': (0.08, 1.0), 'color_jitter': 0.3,
           'blur_sigma': (0.1, 2.0), 'operations': ('grayscale', 'solarize', 'blur'),
           'mean': None, 'std': None, 'eval_resize_size': None, 'eval_crop_size': None,
           'native_max_size': None}
MIXING = {'mixup_alpha': 0.8, 'cutmix_alpha': 1.0, 'switch_prob': 0.5, 'label_smoothing': 0.0,
          'prob': 1.0}


def deit3_groups() -> tuple[ParamGroup, ...]:
  """DeiT-III's table: timm's no-decay group on our flax names.

  timm decays no 1-D param (our ``bias``, LayerNorm ``scale``, LayerScale
  ``gamma``) and none of the model's ``no_weight_decay()`` names
  (``pos_embed``, ``cls_token``); ``register_tokens`` and ``mask_token`` are
  tokens of the same kind.
  """
  return (
      ParamGroup(r'(^|/)(bias|scale|gamma)$', wd_mult=0.0),
      ParamGroup(r'(^|/)(pos_embed|cls_token|register_tokens|mask_token)$', wd_mult=0.0),
  )


def lamb_spec(learning_rate: Schedule | float, weight_decay: Schedule | float = 0.05,
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               max_grad_norm: float | None = 1.0) -> OptimizerSpec:
  """DeiT-III as trained: apex ``FusedLAMB`` (its global ``max_grad_norm`` clip), ``deit3_groups``."""
  return OptimizerSpec(
      learning_rate=learning_rate, weight_decay=weight_decay, groups=deit3_groups(),
      kind='lamb', b1=b1, b2=b2, eps=eps, clip_grad=max_grad_norm, clip_by='global',
      clip_eps=0.0, layerwise_decay=None)


class HostBatches:
  """3-Augment per image, then Mixup/CutMix per process batch -> ``images``, ``targets``."""

  def __init__(self, augment, mixing, num_classes: int):
    self.augment = ThreeAugment(
        image_size=augment.image_size, spatial=augment.spatial,
        crop_scale=tuple(augment.crop_scale), color_jitter=augment.color_jitter,
        blur_sigma=tuple(augment.blur_sigma), operations=tuple(augment.operations),
        mean=augment.mean or transforms.IMAGENET_MEAN, std=augment.std or transforms.IMAGENET_STD)
    self.mixing = MixupCutmix(
        num_classes=num_classes, mixup_alpha=mixing.mixup_alpha,
        cutmix_alpha=mixing.cutmix_alpha, switch_prob=mixing.switch_prob,
        label_smoothing=mixing.label_smoothing, prob=mixing.prob)

  def __call__(self, examples, batch_size: int, seeds):
    ds = examples.random_map(self.augment, seed=seeds('augment'))
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.random_map(self.mixing, seed=seeds('mixing'))


class DeiT3Recipe:
  """See ``vitreg_jax/train/recipe.py`` for the interface."""
  zero_metrics = ()
  progress_keys = ('train_top1', 'lr', 'grad_norm')
  best_metric = ('top1', 'max')
  nonfinite_hint = 'lower optim.base_lr, raise optim.warmup_epochs, or use model.dtype=float32'

  def __init__(self, config):
    config_lib.validate_shared(config, SECTIONS)
    self.config = config
    head = section(config, 'classifier', CLASSIFIER)
    self.augment = section(config, 'augment', AUGMENT)
    mixing = section(config, 'mixing', MIXING)
    config_lib.check_choice(head.loss, classification.LOSSES, 'classifier.loss')
    config_lib.check_choice(head.pool, ('cls', 'mean'), 'classifier.pool')
    config_lib.check_choice(self.augment.spatial, ('src', 'rrc'), 'augment.spatial')
    self.num_classes, self.loss_name = int(head.num_classes), head.loss
    self.image_size = int(self.augment.image_size)
    self.backbone = backbone_from_config(config.model, img_size=self.image_size)
    if self.image_size % self.backbone.patch_size:
      raise config_lib.ConfigError(
          f'augment.image_size={self.image_size} is not a multiple of the patch size '
          f'{self.backbone.patch_size}')
    self.model = ViTClassifier(self.backbone, self.num_classes, head.pool)
    self.global_batch_size = int(config.data.batch_size)
    self.host_batches = HostBatches(self.augment, mixing, self.num_classes)
    s = self.image_size
    self.batch_spec = {
        'image': BatchField((s, s, 3), jnp.float32, ('batch', None, None, None)),
        'targets': BatchField((self.num_classes,), jnp.float32, ('batch', 'classes')),
    }
    o = config.optim
    self.total_steps = int(o.epochs) * int(o.epoch_length)
    # with LAMB: apex FusedLAMB's global clip without an epsilon (lamb_spec)
    self.learning_rate, self.tx = optim.from_config(o, deit3_groups(), self.total_steps)

  # --- state and step --------------------------------------------------------
  def init_state(self, rng: jax.Array) -> TrainState:
    images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    params = self.model.init({'params': rng}, images)['params']
    return TrainState.create(params=params, opt_state=self.tx.init(unbox(params)))

  def _loss(self, params, batch, rng):
    out = self.model.apply({'params': params}, batch['image'], train=True,
                           rngs={'dropout': rng})
    loss = classification.classification_loss(self.loss_name, out['logits'], batch['targets'])
    return loss, out['logits']

  def train_step(self, state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, logits), grads = jax.value_and_grad(self._loss, has_aux=True)(state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        # against the dominant (largest-weight) label of each mixed target
        'train_top1': 100.0 * jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch['targets'], -1)),
        'grad_norm': optax.tree.norm(grads),
        'lr': self.learning_rate(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  # --- evaluation and export -------------------------------------------------
  def classifier(self, state: TrainState):
    return self.model, {'params': state.params}

  def backbone_of(self, state: TrainState):
    return self.backbone, {'params': state.params['backbone']}

  def evaluators(self):
    every = int(self.config.train.eval_every)
    return [ClassificationEvaluator(self.config, self.classifier, every=every)]

  def exports(self, state: TrainState) -> dict[str, Export]:
    """The backbone (timm: DeiT-III's layout, with the classifier head)."""
    model, variables = self.backbone_of(state)
    return {'backbone': Export(model, variables, head=state.params['head'],
                               convert_options={'timm': {'layout': 'deit3'}})}

  def analytic_flops(self, global_batch_size: int) -> float:
    per_image = (flops.vit_forward_flops(self.backbone, (self.image_size, self.image_size))
                 + flops.dense_flops(self.backbone.embed_dim, self.num_classes))
    return flops.TRAIN_FORWARD_MULTIPLIER * per_image * global_batch_size


def make_recipe(config) -> DeiT3Recipe:
  return DeiT3Recipe(config)
