"""DINOv2 with registers: student/EMA-teacher self-distillation (REFERENCE §3).

One step, as the reference ``ssl_meta_arch`` does it, on global arrays:

1. Teacher (EMA weights, eval mode) sees the 2 global crops: its cls tokens go
   through the DINO head, its patch tokens at the student's masked positions
   through the iBOT head (the DINO head unless ``ibot.separate_head``). Targets
   are centred (EMA centre) or Sinkhorn-Knopp'd over the global batch.
2. Student sees the masked global crops and the local crops, one pass per
   resolution: DINO loss (each crop vs the *other* teacher crop), KoLeo on the
   global cls tokens (within groups), iBOT on the masked patches.
3. AdamW with DINOv2's per-parameter lr / weight decay, then the teacher
   EMA and the centre updates.

Batch (per image, crops grouped by size): ``global_crops [B, 2, G, G, 3]``,
``local_crops [B, n, L, L, 3]``, ``masks [B, 2, G/p, G/p]`` bool.

Sharding: the batch axis ``B`` is sharded over the mesh. Crops are merged
batch-major (``[B, C] -> [B * C]``, an image's crops stay on its device) and
split back the same way, head logits are pinned to ``('batch', ...,
'prototypes')``, and centres and Sinkhorn-Knopp sums are reductions over the
sharded axes, so no step gathers the global batch of activations or logits.

Groups: KoLeo, the iBOT masked-patch budget (and the mask-ratio
stratification in the data pipeline that guarantees it) and DINOv2's subset
drop path work within groups of ``group_size`` consecutive images, as the
reference computes them per GPU (its per-GPU batch: 64, 32 for ViT-L/14, 12
for ViT-g/14). The group is a config constant, so the program does not depend
on how many processes or devices run it.

Config keys read: ``model.*``, ``group_size``, ``dino.*``, ``ibot.*``,
``teacher.*``, ``optim.*``, ``centering``, and the data pipeline's
``augment.*`` crop sizes, ``masking.*`` and ``data.batch_size`` (see
``configs/dinov2_reg.py``). Evaluation: kNN top-1 of the teacher's cls token;
export: the teacher backbone.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from vitreg_jax import config as config_lib
from vitreg_jax.analysis import norms
from vitreg_jax.data.multicrop import MultiCropBatches
from vitreg_jax.evals.knn import KnnEvaluator
from vitreg_jax.losses import centering, dino, ibot, koleo
from vitreg_jax.models import layers
from vitreg_jax.models.heads import DINOHead
from vitreg_jax.models.build import backbone_from_config, dtype_from_name
from vitreg_jax.parallel import rules as rules_lib
from vitreg_jax.recipes import dinov2_optim
from vitreg_jax.train import flops, optim, schedules
from vitreg_jax.train.recipe import BatchField, Export
from vitreg_jax.train.state import TrainState, unbox

# Config sections of this recipe, besides the shared ones (vitreg_jax/config.py).
SECTIONS = ('model', 'group_size', 'centering', 'dino', 'ibot', 'teacher', 'augment', 'masking')
NONFINITE_HINT = ('lower optim.base_lr, check the data, or raise optim.clip_grad / use '
                  'model.dtype=float32')


def _merge(x):
  """``[B, C, ...] -> [B * C, ...]``, batch-major: one backbone pass over all crops.

  Row ``b * C + c`` is crop ``c`` of image ``b``, so a device's shard of the
  merged rows is exactly its images' crops (crop-major merging would
  interleave the batch shards and make XLA move activations between devices).
  """
  return x.reshape((-1,) + x.shape[2:])


def _split(x, n_crops: int):
  """``[B * C, ...] -> [C, B, ...]``, the crop-first layout the losses take."""
  return jnp.swapaxes(x.reshape((-1, n_crops) + x.shape[1:]), 0, 1)


CROP_LOGITS = (None, 'batch', 'prototypes')   # [crops, B, K]
SLOT_LOGITS = ('batch', None, 'prototypes')   # [groups, slots, K]


def _mean_entropy(probs):
  return -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def head_flops(head: DINOHead, in_dim: int) -> float:
  dims = [in_dim] + [head.hidden_dim] * (head.nlayers - 1) + [head.bottleneck_dim]
  return sum(flops.dense_flops(a, b) for a, b in zip(dims[:-1], dims[1:])) + flops.dense_flops(
      head.bottleneck_dim, head.out_dim)


class DinoV2Recipe:
  """See ``vitreg_jax/train/recipe.py`` for the interface."""
  # Metrics that must stay exactly zero: the data pipeline stratifies mask
  # ratios within the groups the iBOT budget is computed for.
  zero_metrics = ('ibot_dropped_patches',)
  progress_keys = ('dino_global', 'dino_local', 'koleo', 'ibot', 'lr', 'teacher_entropy')
  best_metric = ('knn_top1', 'max')
  nonfinite_hint = NONFINITE_HINT

  def __init__(self, config):
    config_lib.validate_shared(config, SECTIONS)
    config_lib.check_choice(config.optim.optimizer, ('adamw',), 'optim.optimizer')
    self.config = config
    crops = config.augment
    self.global_size = int(crops.global_crops_size)
    self.local_size = int(crops.local_crops_size)
    self.n_local = int(crops.local_crops_number)
    self.global_batch = int(config.data.batch_size)
    self.global_batch_size = self.global_batch
    self.host_batches = MultiCropBatches(config)
    self.group = group_size(config)
    self.backbone = backbone_from_config(
        config.model, img_size=self.global_size,
        drop_path_groups=self.global_batch // self.group)
    dtype = dtype_from_name(config.model.get('dtype', 'float32'))
    self.dino_head = DINOHead(
        out_dim=config.dino.head_n_prototypes, hidden_dim=config.dino.head_hidden_dim,
        bottleneck_dim=config.dino.head_bottleneck_dim, nlayers=config.dino.head_nlayers,
        dtype=dtype)
    self.separate_ibot_head = bool(config.ibot.separate_head)
    self.ibot_head = DINOHead(
        out_dim=config.ibot.head_n_prototypes, hidden_dim=config.ibot.head_hidden_dim,
        bottleneck_dim=config.ibot.head_bottleneck_dim, nlayers=config.ibot.head_nlayers,
        dtype=dtype) if self.separate_ibot_head else self.dino_head
    config_lib.check_choice(config.centering, centering.CENTERING_MODES, 'centering')
    p = self.backbone.patch_size
    if self.global_size % p or self.local_size % p:
      raise ValueError(f'crop sizes {self.global_size}/{self.local_size} must be multiples of '
                       f'the patch size {p}')
    if config.masking.patch_size != p:
      raise ValueError(f'masking.patch_size={config.masking.patch_size} != model patch size {p}')
    self.grid = self.global_size // p
    self.ibot_budget = ibot.mask_budget(
        2 * self.group, self.grid * self.grid, tuple(config.masking.ratio_min_max),
        config.masking.mask_probability)
    o = config.optim
    lr = o.base_lr
    if o.scaling_rule == 'sqrt_wrt_1024':
      lr = schedules.scaled_lr(o.base_lr, self.global_batch)
    elif o.scaling_rule != 'none':
      raise config_lib.ConfigError(
          f"optim.scaling_rule={o.scaling_rule!r}; valid: 'sqrt_wrt_1024', 'none'")
    t = config.teacher
    self.schedules = dinov2_optim.DinoV2Schedules(
        lr=lr, epochs=o.epochs, epoch_length=o.epoch_length, warmup_epochs=o.warmup_epochs,
        min_lr=o.min_lr, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher, final_momentum_teacher=t.final_momentum_teacher,
        warmup_teacher_temp=t.warmup_teacher_temp, teacher_temp=t.teacher_temp,
        warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs)
    self.tx = dinov2_optim.dinov2_optimizer(
        self.schedules, layerwise_decay=o.layerwise_decay,
        patch_embed_lr_mult=o.patch_embed_lr_mult, clip_grad=o.clip_grad, b1=o.b1, b2=o.b2)
    g, l, grid = self.global_size, self.local_size, self.grid
    self.batch_spec = {
        'global_crops': BatchField((2, g, g, 3), jnp.float32, ('batch', None, None, None, None)),
        'masks': BatchField((2, grid, grid), jnp.bool_, ('batch', None, None, None)),
    }
    if self.n_local:
      self.batch_spec['local_crops'] = BatchField((self.n_local, l, l, 3), jnp.float32,
                                                  ('batch', None, None, None, None))

  @property
  def total_steps(self) -> int:
    return self.schedules.total_steps

  # --- state ---------------------------------------------------------------
  def init_state(self, rng: jax.Array) -> TrainState:
    k_backbone, k_dino, k_ibot = jax.random.split(rng, 3)
    images = jnp.zeros((1, self.global_size, self.global_size, 3), jnp.float32)
    backbone = self.backbone.init({'params': k_backbone}, images)['params']
    tokens = jnp.zeros((1, self.backbone.embed_dim), jnp.float32)
    params = {'backbone': backbone,
              'dino_head': self.dino_head.init({'params': k_dino}, tokens)['params']}
    if self.separate_ibot_head:
      params['ibot_head'] = self.ibot_head.init({'params': k_ibot}, tokens)['params']
    plain = unbox(params)
    return TrainState.create(
        params=params, opt_state=self.tx.init(plain),
        teacher=plain,  # the teacher starts as a copy of the student
        center_dino=jnp.zeros((self.dino_head.out_dim,), jnp.float32),
        center_ibot=jnp.zeros((self.ibot_head.out_dim,), jnp.float32))

  # --- the step ------------------------------------------------------------
  def _ibot_head_params(self, params):
    return params['ibot_head'] if self.separate_ibot_head else params['dino_head']

  def _teacher_targets(self, teacher, global_crops, selection, extras, temperature):
    """Teacher logits -> target distributions for DINO (cls) and iBOT (patches)."""
    out = self.backbone.apply({'params': teacher['backbone']}, _merge(global_crops))
    cls_logits = self.dino_head.apply({'params': teacher['dino_head']}, out['cls'])
    cls_logits = rules_lib.constrain(_split(cls_logits, 2), CROP_LOGITS)
    masked = ibot.gather_patches(_split(out['patches'], 2), selection, self.group)
    patch_logits = self.ibot_head.apply({'params': self._ibot_head_params(teacher)}, masked)
    patch_logits = rules_lib.constrain(patch_logits, SLOT_LOGITS)
    mode = self.config.centering
    dino_probs = centering.teacher_probs(cls_logits, temperature, mode, extras['center_dino'])
    ibot_probs = centering.teacher_probs(patch_logits, temperature, mode, extras['center_ibot'],
                                         valid=selection.valid)
    return jax.lax.stop_gradient((cls_logits, patch_logits, dino_probs, ibot_probs, out))

  def _student_loss(self, params, global_crops, local_crops, masks, selection, targets, rng):
    _, _, dino_probs, ibot_probs, _ = targets
    cfg = self.config
    n_images = global_crops.shape[0]
    k_global, k_local = jax.random.split(rng)
    out = self.backbone.apply({'params': params['backbone']}, _merge(global_crops),
                              masks=_merge(masks), train=True, rngs={'dropout': k_global})
    dino_apply = lambda x: self.dino_head.apply({'params': params['dino_head']}, x)
    global_logits = rules_lib.constrain(_split(dino_apply(out['cls']), 2), CROP_LOGITS)
    local_logits = None
    if self.n_local:
      local_out = self.backbone.apply({'params': params['backbone']}, _merge(local_crops),
                                      train=True, rngs={'dropout': k_local})
      local_logits = rules_lib.constrain(_split(dino_apply(local_out['cls']), self.n_local),
                                         CROP_LOGITS)
    student_temp = cfg.dino.student_temp
    dino_global, dino_local = dino.dino_loss(global_logits, dino_probs, local_logits, student_temp)
    koleo_value = koleo.koleo_loss(_split(out['cls'], 2), self.group)
    masked = ibot.gather_patches(_split(out['patches'], 2), selection, self.group)
    patch_logits = self.ibot_head.apply({'params': self._ibot_head_params(params)}, masked)
    patch_logits = rules_lib.constrain(patch_logits, SLOT_LOGITS)
    ibot_value = ibot.ibot_loss(patch_logits, ibot_probs, selection.weights, 2 * n_images,
                                student_temp)
    total = (cfg.dino.loss_weight * (dino_global + dino_local)
             + cfg.dino.koleo_loss_weight * koleo_value + cfg.ibot.loss_weight * ibot_value)
    terms = {'dino_global': dino_global, 'dino_local': dino_local, 'koleo': koleo_value,
             'ibot': ibot_value}
    return total, terms

  def train_step(self, state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    global_crops, local_crops = batch['global_crops'], batch.get('local_crops')
    masks = batch['masks'].reshape(batch['masks'].shape[:2] + (-1,))  # [B, 2, N]
    selection = ibot.select_masked_patches(jnp.swapaxes(masks, 0, 1), self.group,
                                           self.ibot_budget)
    step_schedules = self.schedules.all(state.step)
    targets = self._teacher_targets(state.extras['teacher'], global_crops, selection,
                                    state.extras, step_schedules['teacher_temp'])
    (loss, terms), grads = jax.value_and_grad(self._student_loss, has_aux=True)(
        state.params, global_crops, local_crops, masks, selection, targets, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = step_schedules['momentum']
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.extras['teacher'], params)
    cls_logits, patch_logits, dino_probs, _, teacher_out = targets
    extras = dict(state.extras, teacher=teacher)
    if self.config.centering == 'centering':
      extras['center_dino'] = centering.update_center(state.extras['center_dino'], cls_logits)
      extras['center_ibot'] = centering.update_center(state.extras['center_ibot'], patch_logits,
                                                      valid=selection.valid)
    metrics = {'loss': loss, **terms, **step_schedules,
               'ibot_dropped_patches': selection.n_dropped.astype(jnp.float32),
               'teacher_high_norm_fraction': norms.high_norm_fraction(teacher_out['patches']),
               # collapse monitor: ln(K) = uniform collapse, 0 = one-hot collapse
               'teacher_entropy': _mean_entropy(dino_probs)}
    for name, norm in optim.submodule_global_norms(grads).items():
      metrics[f'grad_norm/{name}'] = norm
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              extras=extras)
    return new_state, metrics

  # --- evaluation and export -----------------------------------------------
  def teacher_backbone(self, state: TrainState) -> tuple[Any, dict]:
    """``(model, variables)`` of the teacher backbone: what DINOv2 evaluates and ships."""
    return self.backbone, {'params': state.extras['teacher']['backbone']}

  def evaluators(self):
    return [KnnEvaluator(self.config, self.teacher_backbone,
                         every=int(self.config.train.eval_every))]

  def exports(self, state: TrainState) -> dict[str, Export]:
    model, variables = self.teacher_backbone(state)
    return {'backbone': Export(model, variables)}

  def analytic_flops(self, global_batch_size: int) -> float:
    """Model FLOPs of one step; the subset drop path runs residual branches on fewer rows."""
    g, l = (self.global_size,) * 2, (self.local_size,) * 2
    d = self.backbone.embed_dim
    kept = self._drop_path_kept_fraction()
    student_fwd = 2 * flops.vit_forward_flops(self.backbone, g, kept(2)) + (
        self.n_local * flops.vit_forward_flops(self.backbone, l, kept(self.n_local)))
    student_heads = (2 + self.n_local) * head_flops(self.dino_head, d)
    teacher_fwd = 2 * flops.vit_forward_flops(self.backbone, g) + 2 * head_flops(self.dino_head, d)
    per_image = flops.TRAIN_FORWARD_MULTIPLIER * (student_fwd + student_heads) + teacher_fwd
    patch_heads = (flops.TRAIN_FORWARD_MULTIPLIER + 1) * head_flops(self.ibot_head, d)
    groups = global_batch_size // self.group
    return per_image * global_batch_size + patch_heads * self.ibot_budget * groups

  def _drop_path_kept_fraction(self):
    """Fraction of rows whose residual branches run, per number of crops of one size."""
    rate = self.backbone.drop_path_rate
    if self.backbone.drop_path_mode != 'subset' or not rate:
      return lambda crops: 1.0
    rows = lambda crops: max(crops * self.group, 1)
    return lambda crops: layers.subset_size(rows(crops), rate) / rows(crops)


def group_size(config) -> int:
  """Images per group (KoLeo, iBOT budget, subset drop path); must divide the global batch."""
  group, batch = int(config.group_size), int(config.data.batch_size)
  if group < 2 or batch % group:
    raise config_lib.ConfigError(
        f'group_size={group} must be >= 2 and divide the global batch data.batch_size={batch} '
        '(KoLeo and the iBOT budget are computed within groups of this many images)')
  return group


def make_recipe(config) -> DinoV2Recipe:
  return DinoV2Recipe(config)
