"""DINOv2 with registers (the paper's main setting): ``get_config(arg)``.

  --config=configs/dinov2_reg.py                       ViT-L/16, 4 registers, upstream default
                                                       recipe (ImageNet-1k, 100 epochs)
  --config=configs/dinov2_reg.py:variant=L/14          ViT-L/14 ImageNet-22k recipe (SwiGLU,
                                                       Sinkhorn-Knopp, 131072 prototypes)
  --config=configs/dinov2_reg.py:variant=g/14,registers=8
  --config=configs/dinov2_reg.py:smoke                 tiny model, embedded dataset, CPU minutes

Keys: variant (S/14 B/14 L/16 L/14 g/14), registers, batch (global), group,
epochs, strategy (dp | fsdp | fsdp_tp), centering, data (embedded | a tfds name).

The backbone is built at the global crop size (224 -> a 16x16 pos_embed), as
the reference trains it; local crops resample it. ``group_size`` is the
reference's per-GPU batch: KoLeo, the iBOT mask budget and DINOv2's subset
drop path work within groups of that many images, whatever the device count.
Any field can also be set with ``--config.path.to.field=value``.
Facts: shared/REFERENCE.md §3 and dinov2/configs/{ssl_default_config,train/*}.yaml.
"""

import ml_collections

from vitreg_jax import config as config_lib

NUM_REGISTERS = 4
VARIANTS = ('S/14', 'B/14', 'L/16', 'L/14', 'g/14')
# Reference batch per GPU: the groups of KoLeo, the iBOT budget and subset drop path.
PER_GPU_BATCH = {'S/14': 64, 'B/14': 64, 'L/16': 64, 'L/14': 32, 'g/14': 12}
# The reference ViT-g/14 run: 12 images x 256 GPUs (lr 2e-4 * sqrt(3072 / 1024)).
GLOBAL_BATCH = {'g/14': 3072}


def arch_name(variant: str) -> str:
  size, patch = variant.split('/')
  return f'vit{size.lower()}{patch}'


def base_config(registers: int = NUM_REGISTERS) -> ml_collections.ConfigDict:
  """Upstream ``ssl_default_config`` (ViT-L/16, ImageNet-1k short) plus registers."""
  c = config_lib.base_config(
      'dinov2',
      data=dict(source='tfds', name='imagenet2012', split='train', eval_split='validation',
                batch_size=1024, num_workers=8, shuffle=True),
      optim=dict(optimizer='adamw', epochs=100, epoch_length=1250, weight_decay=0.04,
                 weight_decay_end=0.4, base_lr=4e-3, warmup_epochs=10, min_lr=1e-6,
                 clip_grad=3.0, clip_by='submodule', freeze_last_layer_epochs=1,
                 scaling_rule='sqrt_wrt_1024', patch_embed_lr_mult=0.2, layerwise_decay=0.9,
                 b1=0.9, b2=0.999),
      train=dict(log_every=50, checkpoint_every=1250, keep_checkpoints=3, eval_every=12500,
                 export_formats=('vitreg', 'dinov2', 'timm', 'hf'),
                 peak_flops_per_device=197e12),  # TPU v5e bf16; set for your accelerator (MFU)
      eval=dict(knn_ks=(10, 20, 100, 200), knn_temperature=0.07, train_split='train',
                max_train_examples=0, max_eval_examples=0),  # 0: the whole split
      mesh={'data': 1, 'fsdp': -1, 'tensor': 1},
      sharding={'strategy': 'fsdp'})
  c.group_size = PER_GPU_BATCH['L/16']
  c.model = ml_collections.ConfigDict(dict(
      arch=arch_name('L/16'), num_registers=registers, drop_path_rate=0.3,
      drop_path_mode='subset', layerscale_init=1e-5,
      dtype='bfloat16', scan_blocks=True, remat_policy='dots_no_batch', attention_impl='auto'))
  c.centering = 'centering'  # or 'sinkhorn_knopp'
  c.dino = ml_collections.ConfigDict(dict(
      loss_weight=1.0, koleo_loss_weight=0.1, student_temp=0.1,
      head_n_prototypes=65536, head_bottleneck_dim=256, head_nlayers=3, head_hidden_dim=2048))
  c.ibot = ml_collections.ConfigDict(dict(
      loss_weight=1.0, separate_head=False,
      head_n_prototypes=65536, head_bottleneck_dim=256, head_nlayers=3, head_hidden_dim=2048))
  c.teacher = ml_collections.ConfigDict(dict(
      momentum_teacher=0.992, final_momentum_teacher=1.0, warmup_teacher_temp=0.04,
      teacher_temp=0.07, warmup_teacher_temp_epochs=30))
  c.augment = ml_collections.ConfigDict(dict(
      global_crops_size=224, local_crops_size=96, local_crops_number=8,
      global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32),
      blur_probs='as_trained'))  # 'intended' for the BYOL/DINO values (REFERENCE §3)
  c.masking = ml_collections.ConfigDict(dict(
      patch_size=16, mask_probability=0.5, ratio_min_max=(0.1, 0.5)))
  return c


def set_variant(c: ml_collections.ConfigDict, variant: str) -> None:
  """Model + recipe of one of the paper's settings (REFERENCE §3)."""
  config_lib.check_choice(variant, VARIANTS, 'variant')
  patch = int(variant.split('/')[1])
  c.model.arch = arch_name(variant)
  c.masking.patch_size = patch
  c.group_size = PER_GPU_BATCH[variant]
  c.data.batch_size = GLOBAL_BATCH.get(variant, 1024)
  c.augment.local_crops_size = 98 if patch == 14 else 96
  if variant in ('L/14', 'g/14'):  # the ImageNet-22k recipe: train/vitl14.yaml, vitg14.yaml
    c.model.ffn = 'swiglu'
    c.model.drop_path_rate = 0.4
    c.centering = 'sinkhorn_knopp'
    c.dino.head_n_prototypes = 131072
    c.dino.head_bottleneck_dim = 384
    c.ibot.separate_head = True
    c.ibot.head_n_prototypes = 131072
    c.teacher.momentum_teacher = 0.994
    c.optim.update(epochs=500, weight_decay_end=0.2, base_lr=2e-4, warmup_epochs=80,
                   layerwise_decay=1.0)
    c.data.name = 'imagenet2012'  # ImageNet-22k is not in tfds: point data.* at your copy
    # Planned with the TPU compiler on v5e:16x16 (experiments/plan_pods.py): saving the
    # matmul outputs (dots_no_batch) needs 19.7 GiB per chip for L/14 at 4 images per
    # chip, recomputing the blocks 1.6 GiB.
    c.model.remat_policy = 'full'
  if variant == 'g/14':
    c.sharding.strategy = 'fsdp'


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """A 4-block ViT on 32x32 crops of the embedded dataset: minutes on 2 CPU cores."""
  c.model = ml_collections.ConfigDict(dict(
      arch='vits14', num_registers=c.model.num_registers, patch_size=8, embed_dim=96, depth=4,
      num_heads=3, drop_path_rate=0.1, drop_path_mode='subset', layerscale_init=1.0,
      dtype='float32', scan_blocks=False, remat_policy='none', attention_impl='auto'))
  # Departures from upstream, each measured on the embedded data (README, "The
  # quickstart's result"; experiments/dinov2_smoke_curves.py):
  # * LayerScale 1 (upstream 1e-5): at 1e-5 a few-hundred-step model's cls token
  #   stays nearly input-independent and the teacher collapses to uniform;
  # * 256 prototypes (65536): K >> 2 x batch makes the targets near-uniform;
  # * teacher temperature 0.03 throughout (upstream 0.04 -> 0.07): the teacher
  #   collapses to uniform at 0.07 (entropy 5.35-5.45 of ln 256 = 5.55 from step
  #   ~100 on), stays borderline at 0.04 (4.6-4.8) and clear at 0.03 (~3.8);
  # * teacher momentum 0.996 (0.992): a slower teacher, same collapse evidence;
  # * base lr 6e-3 (4e-3; x sqrt(32/1024) = 1.1e-3 at batch 32): kNN rose at every
  #   eval (23.8 -> 27.0%) where 2e-3 plateaued at 25-26%;
  # * 4 local crops (8), batch 32, 600 steps: CPU minutes.
  c.group_size = 32
  c.dino.update(head_n_prototypes=256, head_bottleneck_dim=64, head_hidden_dim=256)
  c.ibot.update(head_n_prototypes=256, head_bottleneck_dim=64, head_hidden_dim=256)
  c.teacher.update(momentum_teacher=0.996, warmup_teacher_temp=0.03, teacher_temp=0.03,
                   warmup_teacher_temp_epochs=2)
  c.optim.update(epochs=12, epoch_length=50, warmup_epochs=1, base_lr=6e-3)
  c.data.update(source='embedded', name='', split='train', eval_split='val', batch_size=32,
                num_workers=0, shuffle=True,
                embedded=dict(image_size=48, num_train=1024, num_val=256, num_classes=6))
  c.augment.update(global_crops_size=32, local_crops_size=16, local_crops_number=4,
                   eval_resize_size=36, eval_crop_size=32)
  c.masking.patch_size = 8
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.sharding.strategy = 'dp'
  c.train.update(log_every=25, checkpoint_every=100, eval_every=150,
                 peak_flops_per_device=0.0)  # 0: measure this machine's matmul peak
  c.eval.update(knn_ks=(10, 20), max_train_examples=0, max_eval_examples=0)


PRESETS = {'smoke': apply_smoke}
KEYS = {
    'variant': set_variant,
    'registers': config_lib.set_registers,
    'batch': 'data.batch_size',
    'group': 'group_size',
    'epochs': 'optim.epochs',
    'strategy': 'sharding.strategy',
    'centering': 'centering',
    'data': lambda c, v: c.data.update(source='embedded') if v == 'embedded' else c.data.update(
        source='tfds', name=v),
}


def get_config(arg: str | None = None, registers: int = NUM_REGISTERS) -> ml_collections.ConfigDict:
  # variant sets the preset's batch, group, lr ...: applied before the other keys
  return config_lib.parse_arg(base_config(registers), arg, PRESETS, KEYS, first=('variant',))
