"""DeiT-III with registers (the paper's third model): ``get_config(arg)``.

  --config=configs/deit3_reg.py                        ViT-B/16, 4 registers, the ImageNet-21k
                                                       pretraining recipe (the paper's setting)
  --config=configs/deit3_reg.py:schedule=in1k,variant=S   the ImageNet-1k recipe (192 px, BCE)
  --config=configs/deit3_reg.py:variant=L,registers=8
  --config=configs/deit3_reg.py:smoke                  tiny ViT, embedded dataset, CPU minutes

Keys: variant (S B L), schedule (in21k | in1k), registers, batch (global),
epochs, strategy (dp | fsdp | fsdp_tp), data (embedded | a tfds name).
Any field can also be set with ``--config.path.to.field=value``.

Facts: shared/REFERENCE.md §8 (facebookresearch/deit README_revenge.md, main.py,
augment.py, models_v2.py): LAMB, batch 2048, 5 warmup epochs from 1e-6, min lr
1e-5, cosine; IN-21k: 240 epochs at 224, lr 1e-3, wd 0.02, soft-target CE with
smoothing 0.1, CutMix 1.0 only, 3-Augment with simple random crop; IN-1k: 800
epochs at 192, lr 3e-3 (S: 4e-3 at 224), wd 0.05, BCE, Mixup 0.8 + CutMix 1.0,
3-Augment with random-resized crop. Drop path per size and schedule below.
"""

import ml_collections

from vitreg_jax import config as config_lib

NUM_REGISTERS = 4
VARIANTS = ('S', 'B', 'L')
SCHEDULES = ('in21k', 'in1k')
IMAGENET_1K_TRAIN = 1_281_167
IMAGENET_21K_TRAIN = 14_197_122  # the fall11 release; set optim.epoch_length for your copy
GLOBAL_BATCH = 2048
# (schedule, variant) -> (lr, image size, drop path); REFERENCE §8 and README_revenge.md
SETTINGS = {
    ('in21k', 'S'): (1e-3, 224, 0.0), ('in21k', 'B'): (1e-3, 224, 0.1),
    ('in21k', 'L'): (1e-3, 224, 0.3),
    ('in1k', 'S'): (4e-3, 224, 0.05), ('in1k', 'B'): (3e-3, 192, 0.2),
    ('in1k', 'L'): (3e-3, 192, 0.45),
}


def base_config(registers: int = NUM_REGISTERS) -> ml_collections.ConfigDict:
  c = config_lib.base_config(
      'deit3',
      data=dict(source='tfds', name='imagenet2012', split='train', eval_split='validation',
                batch_size=GLOBAL_BATCH, num_workers=8, shuffle=True),
      optim=dict(optimizer='lamb', warmup_epochs=5, warmup_init_lr=1e-6, min_lr=1e-5,
                 clip_grad=1.0, clip_by='global', b1=0.9, b2=0.999, eps=1e-8,
                 layerwise_decay=1.0),
      train=dict(log_every=100, checkpoint_every=2000, keep_checkpoints=3, eval_every=10000,
                 export_formats=('vitreg', 'timm'), peak_flops_per_device=197e12),
      mesh={'data': 1, 'fsdp': -1, 'tensor': 1},
      sharding={'strategy': 'fsdp'})
  c.model = ml_collections.ConfigDict(dict(
      arch='vitb16', num_registers=registers, drop_path_rate=0.1, drop_path_mode='sample',
      layerscale_init=1e-4, dtype='bfloat16', scan_blocks=True, remat_policy='none',
      attention_impl='auto'))
  c.classifier = ml_collections.ConfigDict(dict(num_classes=1000, pool='cls', loss='soft_ce'))
  c.augment = ml_collections.ConfigDict(dict(
      image_size=224, spatial='src', crop_scale=(0.08, 1.0), color_jitter=0.3,
      blur_sigma=(0.1, 2.0), operations=('grayscale', 'solarize', 'blur'),
      eval_resize_size=224, eval_crop_size=224))  # eval crop ratio 1.0
  c.mixing = ml_collections.ConfigDict(dict(
      mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, prob=1.0))
  _apply(c, 'in21k', 'B')
  return c


def _apply(c: ml_collections.ConfigDict, schedule: str, variant: str) -> None:
  lr, size, drop_path = SETTINGS[(schedule, variant)]
  c.model.arch = f'vit{variant.lower()}16'
  c.model.drop_path_rate = drop_path
  c.augment.update(image_size=size, eval_resize_size=size, eval_crop_size=size)
  c.optim.base_lr = lr
  if schedule == 'in21k':
    c.data.name = 'imagenet21k'  # not in tfds: point data.* at your copy
    c.classifier.update(num_classes=21843, loss='soft_ce')
    c.augment.spatial = 'src'
    c.mixing.update(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    c.optim.update(epochs=240, weight_decay=0.02,
                   epoch_length=IMAGENET_21K_TRAIN // c.data.batch_size)
  else:
    c.data.name = 'imagenet2012'
    c.classifier.update(num_classes=1000, loss='bce')
    c.augment.spatial = 'rrc'
    c.mixing.update(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0)
    c.optim.update(epochs=800, weight_decay=0.05,
                   epoch_length=IMAGENET_1K_TRAIN // c.data.batch_size)
  c.schedule, c.variant = schedule, variant


def set_variant(c, value: str) -> None:
  config_lib.check_choice(value, VARIANTS, 'variant')
  _apply(c, c.schedule, value)


def set_schedule(c, value: str) -> None:
  config_lib.check_choice(value, SCHEDULES, 'schedule')
  _apply(c, value, c.variant)


def set_batch(c, value: str) -> None:
  """The global batch; an epoch stays one pass over the data (epoch_length follows)."""
  batch = int(value)
  examples = c.optim.epoch_length * c.data.batch_size
  c.data.batch_size = batch
  c.optim.epoch_length = max(1, examples // batch)


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """A 4-block ViT on 32x32 crops of the embedded dataset's 6 classes: ~2 CPU minutes.

  Departures from the IN-21k recipe, for 640 steps on 1024 images, each
  measured (val top-1 at step 640; chance 16.7%): step 2 of 3-Augment off
  (``augment.operations=()``: grayscale removes the saturation that sets the
  shapes off their textured backgrounds, and the tiny ViT then barely learns in
  this run: full 3-Augment 21.9%, grayscale on every image 17.6%, crop + flip
  34.4%, crop + flip + colour jitter 35.2%, this preset); AdamW at lr 3e-4
  (1e-3 does not learn: 18.8%; LAMB's trust ratio makes tiny models' first
  steps slow); no Mixup/CutMix (they regularise a long run; here they only slow
  learning); LayerScale 1 (1e-4 delays learning past the run's end, as in the
  DINOv2 smoke preset); no drop path; blur sigma scaled to the 32-px crops.
  """
  c.model = ml_collections.ConfigDict(dict(
      arch='vits16', num_registers=c.model.num_registers, patch_size=8, embed_dim=96, depth=4,
      num_heads=3, drop_path_rate=0.0, drop_path_mode='sample', layerscale_init=1.0,
      dtype='float32', scan_blocks=False, remat_policy='none', attention_impl='auto'))
  c.classifier.update(num_classes=6, loss='soft_ce')
  c.augment.update(image_size=32, spatial='src', eval_resize_size=32, eval_crop_size=32,
                   operations=(), blur_sigma=(0.015, 0.3))
  c.mixing.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
  c.optim.update(optimizer='adamw', epochs=20, epoch_length=32, warmup_epochs=1, base_lr=3e-4,
                 warmup_init_lr=1e-6, min_lr=1e-5, weight_decay=0.05)
  c.data.update(source='embedded', name='', split='train', eval_split='val', batch_size=32,
                num_workers=0, shuffle=True,
                embedded=dict(image_size=48, num_train=1024, num_val=256, num_classes=6))
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.sharding.strategy = 'dp'
  c.train.update(log_every=32, checkpoint_every=64, eval_every=160,
                 peak_flops_per_device=0.0)


PRESETS = {'smoke': apply_smoke}
KEYS = {
    'variant': set_variant,
    'schedule': set_schedule,
    'registers': config_lib.set_registers,
    'batch': set_batch,
    'epochs': 'optim.epochs',
    'strategy': 'sharding.strategy',
    'data': lambda c, v: c.data.update(source='embedded') if v == 'embedded' else c.data.update(
        source='tfds', name=v),
}


def get_config(arg: str | None = None, registers: int = NUM_REGISTERS) -> ml_collections.ConfigDict:
  # schedule and variant set lr, size, loss ...: applied before presets and other keys
  return config_lib.parse_arg(base_config(registers), arg, PRESETS, KEYS,
                              first=('schedule', 'variant'))
