"""CLIP with registers (the paper's second model): ``get_config(arg)``.

  --config=configs/clip_reg.py                    OpenCLIP ViT-B/16 + 4 registers, batch 32k
  --config=configs/clip_reg.py:loss=siglip        sigmoid loss (scale ln 10, bias -10)
  --config=configs/clip_reg.py:lit=timm:/path/backbone.safetensors   LiT: locked image tower
  --config=configs/clip_reg.py:smoke              tiny towers, embedded captions, CPU minutes

Keys: registers, batch (global), epochs, loss (clip | siglip), loss_impl (plain |
chunked: linear memory in the global batch), lit (a converter spec of a
pretrained image tower, locked), strategy, data (embedded | a tfds name |
a .jsonl/.csv caption list). Any field: ``--config.path.to.field=value``.

Facts (shared/REFERENCE.md §4, §9, §10): OpenCLIP ViT-B-16: embed 512, image
224/16, width 768, 12 layers, no LayerScale; with registers it is the timm
tower (``vit_base_patch16_224`` + ``reg_tokens``: patch bias, LayerNorm eps
1e-6), used with and without registers here so the two differ only there; text context 77, vocab 49408, width 512, 8 heads, 12 layers, GELU;
log logit scale init ln(1/0.07), clamped to [0, ln 100] after every step;
AdamW (b2 0.98, eps 1e-6), no weight decay on gains, biases, embeddings and
the logit scale/bias; warmup + cosine. The LAION-400M B/16 run: batch 32768,
lr 5e-4, weight decay 0.2, 2000 warmup steps, 32 epochs.
"""

import math

import ml_collections

from vitreg_jax import config as config_lib

NUM_REGISTERS = 4
GLOBAL_BATCH = 32768
LAION_400M = 400_000_000  # set optim.epoch_length for your copy of the data
WARMUP_STEPS = 2000
LOSSES = ('clip', 'siglip')
LOSS_IMPLS = ('plain', 'chunked')
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (train and eval)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def base_config(registers: int = NUM_REGISTERS) -> ml_collections.ConfigDict:
  epoch_length = LAION_400M // GLOBAL_BATCH
  c = config_lib.base_config(
      'clip',
      data=dict(source='captions', name='', path='', split='train', eval_split='validation',
                batch_size=GLOBAL_BATCH, num_workers=8, shuffle=True),
      optim=dict(optimizer='adamw', epochs=32, epoch_length=epoch_length,
                 warmup_epochs=WARMUP_STEPS / epoch_length, base_lr=5e-4, min_lr=0.0,
                 warmup_init_lr=0.0, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
                 clip_grad=0.0, clip_by='global'),
      train=dict(log_every=100, checkpoint_every=2000, keep_checkpoints=3, eval_every=10000,
                 export_formats=('vitreg', 'timm'), peak_flops_per_device=197e12),
      mesh={'data': 1, 'fsdp': -1, 'tensor': 1},
      sharding={'strategy': 'fsdp'})
  # timm's vit_base_patch16_224 + reg_tokens: OpenCLIP's timm-tower route (REFERENCE §9)
  c.model = ml_collections.ConfigDict(dict(
      arch='vitb16', num_registers=registers, img_size=224, layerscale_init=None,
      norm_eps=1e-6, drop_path_rate=0.0, dtype='bfloat16', scan_blocks=True,
      # v5e-256 at 128 images/chip (TPU compiler, README): 26 GB of temporaries without
      # remat, 2.5 GiB peak with full remat (both towers)
      remat_policy='full', attention_impl='auto'))
  c.text = ml_collections.ConfigDict(dict(
      width=512, depth=12, num_heads=8, vocab_size=49408, context_length=77, act='gelu',
      bpe_path=None))
  c.clip = ml_collections.ConfigDict(dict(
      embed_dim=512, pool='cls', loss='clip', loss_impl='plain',
      init_logit_scale=math.log(1 / 0.07), init_logit_bias=None,
      max_logit_scale=math.log(100.0), lit=''))
  c.augment = ml_collections.ConfigDict(dict(
      image_size=224, crop_scale=(0.9, 1.0), eval_resize_size=224, eval_crop_size=224,
      mean=CLIP_MEAN, std=CLIP_STD))
  c.zeroshot = ml_collections.ConfigDict(dict(classnames='imagenet', templates='openai'))
  return c


def set_loss(c, value: str) -> None:
  """``siglip`` also sets OpenCLIP's ``--siglip`` inits (scale ln 10, bias -10)."""
  config_lib.check_choice(value, LOSSES, 'loss')
  c.clip.loss = value
  if value == 'siglip':
    c.clip.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
  else:
    c.clip.update(init_logit_scale=math.log(1 / 0.07), init_logit_bias=None)


def set_batch(c, value: str) -> None:
  """The global batch; an epoch stays one pass over the data (epoch_length follows)."""
  batch = int(value)
  examples = c.optim.epoch_length * c.data.batch_size
  warmup_steps = c.optim.warmup_epochs * c.optim.epoch_length
  c.data.batch_size = batch
  c.optim.epoch_length = max(1, examples // batch)
  c.optim.warmup_epochs = warmup_steps / c.optim.epoch_length


def set_data(c, value: str) -> None:
  if value == 'embedded':
    c.data.update(source='embedded', name='', path='')
  elif value.endswith(('.jsonl', '.json', '.csv', '.tsv')):
    c.data.update(source='captions', name='', path=value)
  else:
    c.data.update(source='tfds', name=value, path='')


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny towers on the embedded dataset's captions ("a red circle above a small blue square").

  Zero-shot top-1 on the embedded val split over its 6 shape classes (prompts
  worded like the captions, ``zeroshot.templates='embedded'``); chance 16.7%.
  Shapes are what a tiny contrastive model learns last (colours separate a
  batch sooner), so the run is long for a smoke: 1280 steps, ~5 CPU minutes.
  Measured (zero-shot top-1 at steps 160..1280): lr 3e-4: 16.8 / 22.3 / 26.6 /
  23.4 / 27.0 / 28.9 / 29.3 / 29.7; lr 1e-3 over 640 steps: 22.3 at the end, no
  better than random init (22.7 / 18.8 / 15.2% for seeds 0 / 1 / 2).
  """
  c.model = ml_collections.ConfigDict(dict(
      arch='vits16', num_registers=c.model.num_registers, patch_size=8, embed_dim=96, depth=4,
      num_heads=3, img_size=32, layerscale_init=None, norm_eps=1e-6, drop_path_rate=0.0,
      dtype='float32', scan_blocks=False, remat_policy='none', attention_impl='auto'))
  c.text.update(width=64, depth=2, num_heads=2, context_length=16)
  c.clip.update(embed_dim=64)
  c.augment.update(image_size=32, crop_scale=(0.9, 1.0), eval_resize_size=32, eval_crop_size=32)
  c.zeroshot.update(classnames='embedded', templates='embedded')
  c.optim.update(epochs=40, epoch_length=32, warmup_epochs=1, base_lr=3e-4, min_lr=1e-5,
                 weight_decay=0.05)
  c.data.update(source='embedded', name='', path='', split='train', eval_split='val',
                batch_size=32, num_workers=0, shuffle=True,
                embedded=dict(image_size=48, num_train=1024, num_val=256, num_classes=6))
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.sharding.strategy = 'dp'
  c.train.update(log_every=32, checkpoint_every=64, eval_every=160, peak_flops_per_device=0.0)


PRESETS = {'smoke': apply_smoke}
KEYS = {
    'registers': config_lib.set_registers,
    'batch': set_batch,
    'epochs': 'optim.epochs',
    'loss': set_loss,
    'loss_impl': 'clip.loss_impl',
    'lit': 'clip.lit',
    'strategy': 'sharding.strategy',
    'data': set_data,
}


def get_config(arg: str | None = None, registers: int = NUM_REGISTERS) -> ml_collections.ConfigDict:
  return config_lib.parse_arg(base_config(registers), arg, PRESETS, KEYS)
