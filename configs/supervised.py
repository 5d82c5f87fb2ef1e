"""Supervised ViT classification (the seed of the DeiT-III recipe).

Usage: ``--config=configs/supervised.py:ARG`` where ``ARG`` is a comma list of
presets and ``key=value`` settings, e.g.

* ``configs/supervised.py`` — ViT-B/16 with 4 registers, ImageNet-1k shapes.
* ``configs/supervised.py:smoke`` — a tiny ViT on 32x32 images, for CPU.
* ``configs/supervised.py:arch=vitl16_reg,strategy=fsdp_tp,batch=4096``.

Keys: ``arch``, ``strategy`` (dp | fsdp | fsdp_tp), ``batch`` (global batch
size), ``steps``, ``classes``, ``image``. Any field can also be set with
``--config.path.to.field=value``.
"""

import ml_collections

PRESETS = ('smoke',)
KEYS = {
    'arch': ('model.arch', str),
    'strategy': ('sharding.strategy', str),
    'batch': ('input.global_batch_size', int),
    'steps': ('total_steps', int),
    'classes': ('num_classes', int),
    'image': ('input.image_size', int),
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'supervised'
  c.seed = 0
  c.total_steps = 300 * 1251  # 300 ImageNet epochs at batch 1024
  c.num_classes = 1000
  c.pool = 'cls'
  c.label_smoothing = 0.1

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'vitb16_reg'
  c.model.dtype = 'bfloat16'  # compute dtype; params stay float32
  c.model.drop_path_rate = 0.1
  c.model.layerscale_init = 1e-4
  c.model.scan_blocks = True
  c.model.remat_policy = 'none'
  c.model.attention_impl = 'auto'

  c.input = ml_collections.ConfigDict()
  c.input.global_batch_size = 1024
  c.input.image_size = 224

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.end_lr = 1e-6
  c.optimizer.warmup_steps = 5 * 1251
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0

  # Mesh axes outermost -> innermost; one may be -1 (all remaining devices).
  c.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1})
  c.sharding = ml_collections.ConfigDict({'strategy': 'fsdp'})
  # Multi-process: 'auto' initialises on TPU pods / SLURM / MPI or when values are given.
  c.distributed = ml_collections.ConfigDict(
      {'mode': 'auto', 'coordinator_address': '', 'num_processes': 0, 'process_id': -1})
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """A 2-block, 32-wide ViT on 32x32 images: compiles and steps in seconds on CPU."""
  c.model = ml_collections.ConfigDict({
      'arch': 'vitti16_reg', 'patch_size': 8, 'embed_dim': 32, 'depth': 2, 'num_heads': 4,
      'num_registers': 2, 'img_size': 32, 'dtype': 'float32', 'drop_path_rate': 0.0,
      'layerscale_init': 1e-4, 'scan_blocks': False, 'remat_policy': 'none',
      'attention_impl': 'xla'})
  c.num_classes = 10
  c.label_smoothing = 0.0
  c.input.global_batch_size = 16
  c.input.image_size = 32
  c.total_steps = 20
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 2
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  c.sharding.strategy = 'dp'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Presets first (whatever their position in ``arg``), then ``key=value`` settings."""
  c = base_config()
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  for token in (t for t in tokens if '=' not in t):
    if token not in PRESETS:
      raise ValueError(f'unknown preset {token!r}; presets: {PRESETS}, keys: {sorted(KEYS)}')
    apply_smoke(c)
  for token in (t for t in tokens if '=' in t):
    key, value = token.split('=', 1)
    if key not in KEYS:
      raise ValueError(f'unknown config key {key!r}; valid keys: {sorted(KEYS)}')
    path, cast = KEYS[key]
    *parents, leaf = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = cast(value)
  return c
