"""The CLIP recipe's step: the logit scale clamped after every step (the bias never), LiT's
locked image tower loaded through the converter, the no-decay table, plain == chunked."""

import jax
import numpy as np
import pytest

import main_testing
from vitreg_jax import config as config_lib
from vitreg_jax import convert
from vitreg_jax import recipes
from vitreg_jax.recipes.clip import clip_groups
from vitreg_jax.train.state import unbox


def tiny_config(*args):
  config = config_lib.from_file(f'{main_testing.REPO}/configs/clip_reg.py',
                                ','.join(('smoke',) + args))
  config.model.update(depth=1)
  config.text.update(depth=1)
  config.data.batch_size = 8
  return config


def batch(recipe, seed=0):
  rng = np.random.default_rng(seed)
  captions = [f'a red circle above a small blue square {i}' for i in range(8)]
  return {'image': rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
          'tokens': recipe.tokenizer.tokenize(captions)}


def one_step(recipe, state, seed=0):
  step = jax.jit(recipe.train_step)
  return step(state, batch(recipe, seed), jax.random.key(seed))


def test_logit_scale_is_clamped_after_every_step_and_the_bias_never():
  config = tiny_config('loss=siglip')
  config.clip.update(init_logit_scale=6.0, init_logit_bias=-10.0)  # ln 100 = 4.605
  recipe = recipes.build(config)
  state = recipe.init_state(jax.random.key(0))
  state = state.replace(params=unbox(state.params))
  assert float(state.params['logit_scale']) == 6.0
  state, metrics = one_step(recipe, state)
  assert float(state.params['logit_scale']) == pytest.approx(np.log(100.0), abs=1e-6)
  assert float(metrics['logit_scale']) == pytest.approx(np.exp(6.0), rel=1e-5)  # before
  state, _ = one_step(recipe, state, seed=1)  # step 0's warmup lr is 0; step 1's is not
  assert float(state.params['logit_scale']) <= np.log(100.0) + 1e-6
  bias = float(state.params['logit_bias'])
  assert bias != -10.0 and bias < 0  # moved by its update, not clamped to [0, ln 100]


def test_no_weight_decay_table():
  rows = clip_groups()
  def wd(path):
    mult = 1.0
    for row in rows:
      if row.matches(path):
        mult *= row.wd_mult
    return mult
  for path in ('logit_scale', 'logit_bias', 'visual/blocks_0/attn/qkv/bias',
               'visual/norm/scale', 'text/ln_final/scale', 'text/positional_embedding',
               'visual/pos_embed', 'visual/cls_token', 'visual/register_tokens'):
    assert wd(path) == 0.0, path
  for path in ('visual/blocks_0/attn/qkv/kernel', 'image_projection', 'text/text_projection',
               'text/token_embedding/embedding'):
    assert wd(path) == 1.0, path
  assert [r.lr_mult for r in clip_groups(lit=True) if r.matches('visual/blocks_0/mlp/fc1/kernel')] == [0.0]


def test_lit_loads_the_image_tower_and_keeps_it_locked(tmp_path):
  donor = recipes.build(tiny_config())
  donor_state = donor.init_state(jax.random.key(7))
  visual = jax.tree.map(np.asarray, unbox(donor_state.params['visual']))
  convert.save(donor.visual, {'params': visual}, f'vitreg:{tmp_path}/tower')

  recipe = recipes.build(tiny_config(f'lit=vitreg:{tmp_path}/tower'))
  state = recipe.init_state(jax.random.key(0))  # another seed: only the tower comes from the file
  state = state.replace(params=unbox(state.params))
  jax.tree.map(np.testing.assert_array_equal, state.params['visual'], visual)
  text_before = jax.tree.map(np.asarray, state.params['text'])
  state, _ = one_step(recipe, state)
  state, _ = one_step(recipe, state, seed=1)  # step 0's warmup lr is 0
  jax.tree.map(np.testing.assert_array_equal, state.params['visual'], visual)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                       state.params['text'], text_before))
  assert max(moved) > 0


def test_lit_refuses_a_tower_that_does_not_fit(tmp_path):
  donor = recipes.build(tiny_config())
  visual = jax.tree.map(np.asarray, unbox(donor.init_state(jax.random.key(0)).params['visual']))
  convert.save(donor.visual, {'params': visual}, f'vitreg:{tmp_path}/tower')
  config = tiny_config(f'lit=vitreg:{tmp_path}/tower')
  config.model.depth = 2
  recipe = recipes.build(config)
  with pytest.raises(config_lib.ConfigError, match=r"clip.lit='vitreg:.*does not fit model"):
    recipe.init_state(jax.random.key(0))


@pytest.mark.parametrize('loss', ['clip', 'siglip'])
def test_plain_and_chunked_steps_agree_on_a_mesh(loss):
  results = {}
  for impl in ('plain', 'chunked'):
    config = tiny_config(f'loss={loss}', f'loss_impl={impl}')
    config.mesh.update(data=4, fsdp=2, tensor=1)
    sharded = recipes.sharded(config)
    state = sharded.init(jax.random.key(0))
    batch_ = sharded.global_batch(batch(sharded.recipe), 8)
    state, metrics = sharded.train_step(state, batch_, jax.random.key(1))
    results[impl] = jax.device_get((metrics['loss'], state.params))
  (loss_a, params_a), (loss_b, params_b) = results['plain'], results['chunked']
  assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_a, params_b)
