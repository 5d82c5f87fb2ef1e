"""Every DINOv2 preset constructs at full size, lowers for a mesh, and trains at smoke size.

Full size is checked abstractly (``eval_shape`` and lowering: nothing is
allocated); the same recipe, shrunk to a few thousand parameters but keeping
each preset's structure (FFN, centering, heads, remat, scan, drop-path mode,
batch/group ratio), trains two steps on the embedded data.
"""

import math
import pathlib

import jax
import numpy as np
import pytest

from vitreg_jax import config as config_lib
from vitreg_jax import recipes
from vitreg_jax.data import pipeline
from vitreg_jax.train.state import unbox

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
VARIANTS = ('S/14', 'B/14', 'L/16', 'L/14', 'g/14')
# Backbone parameters at 518 from REFERENCE §1 (M), and the FFN each preset trains with.
REFERENCE_PARAMS_518 = {'S/14': 22.06, 'B/14': 86.58, 'L/16': None, 'L/14': None, 'g/14': 1136.49}
GROUP = {'S/14': 64, 'B/14': 64, 'L/16': 64, 'L/14': 32, 'g/14': 12}


def load(file: str, arg: str):
  return config_lib.from_file(CONFIGS / file, arg)


@pytest.mark.parametrize('file', ['dinov2_reg.py', 'dinov2.py'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_preset_constructs_at_full_size(file, variant):
  config = load(file, f'variant={variant}')
  recipe = recipes.build(config)
  params = unbox(jax.eval_shape(recipe.init_state, jax.random.key(0)).params)
  backbone = params['backbone']
  patch = int(variant.split('/')[1])
  dim = backbone['norm']['scale'].shape[0]
  # Built at the global crop size, as the reference trains: 224 -> (224 / p)^2 + cls.
  assert backbone['pos_embed'].shape == (1, 1 + (224 // patch) ** 2, dim)
  registers = 4 if file == 'dinov2_reg.py' else 0
  assert backbone.get('register_tokens', np.zeros((1, 0))).shape[1] == registers
  assert config.group_size == GROUP[variant]
  assert config.data.batch_size % config.group_size == 0
  if variant == 'g/14':  # the reference run: 12 x 256 GPUs, lr 2e-4 sqrt(3)
    assert config.data.batch_size == 3072
    assert recipe.schedules.lr == pytest.approx(2e-4 * math.sqrt(3))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(backbone)) / 1e6
  if REFERENCE_PARAMS_518[variant] and registers:
    pos_difference = (37 * 37 - (224 // patch) ** 2) * dim / 1e6
    assert n == pytest.approx(REFERENCE_PARAMS_518[variant] - pos_difference, abs=0.01)


@pytest.mark.parametrize('variant', VARIANTS)
def test_preset_lowers_for_a_mesh_at_full_size(variant):
  """The full-size step traces and lowers with its shardings on 8 devices (no compile)."""
  config = load('dinov2_reg.py', f'variant={variant}')
  trainer = recipes.sharded(config)
  lowered = trainer.lower(config.data.batch_size)
  assert 'stablehlo' in lowered.as_text()[:20000] or lowered.as_text()


def smoke_sized(variant: str):
  """The preset with a tiny model, crops, heads and batch; its structure unchanged."""
  config = load('dinov2_reg.py', f'variant={variant}')
  patch = int(variant.split('/')[1])
  group = 4
  config.model.update(embed_dim=32, depth=1, num_heads=2, dtype='float32')
  config.augment.update(global_crops_size=2 * patch, local_crops_size=patch, local_crops_number=1,
                        eval_resize_size=2 * patch, eval_crop_size=2 * patch)
  config.masking.update(mask_probability=0.5, ratio_min_max=(0.1, 0.5))
  for head in (config.dino, config.ibot):
    head.update(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16)
  batch = config.data.batch_size // config.group_size * group  # keep the batch / group ratio
  batch = min(batch, 4 * group)
  config.group_size = group
  config.data = dict(source='embedded', split='train', eval_split='val', batch_size=batch,
                     num_workers=0, shuffle=True,
                     embedded=dict(image_size=2 * patch + 8, num_train=64, num_val=16,
                                   num_classes=4))
  config.mesh.update(data=1, fsdp=2, tensor=1)
  config.optim.update(epochs=2, epoch_length=2, warmup_epochs=1)
  config.teacher.warmup_teacher_temp_epochs = 1
  return config


@pytest.mark.parametrize('variant', VARIANTS)
def test_preset_trains_at_smoke_size(variant):
  config = smoke_sized(variant)
  trainer = recipes.sharded(config, devices=jax.devices()[:2])
  state = trainer.init(jax.random.key(0))
  batches = pipeline.build_train_pipeline(config, trainer.recipe.host_batches, seed=0)
  start = jax.device_get(state.params)
  try:
    for _ in range(2):
      local = next(batches)
      batch = trainer.global_batch({k: local[k] for k in trainer.recipe.batch_spec},
                                   config.data.batch_size)
      state, metrics = trainer.train_step(state, batch, jax.random.key(1))
  finally:
    batches.close()
  metrics = jax.device_get(metrics)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert metrics['ibot_dropped_patches'] == 0
  assert metrics['ibot'] > 0 and metrics['dino_local'] > 0
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), start, jax.device_get(state.params))
  assert max(jax.tree.leaves(moved)) > 0
