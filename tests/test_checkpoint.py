"""A damaged latest checkpoint is reported and skipped; nothing is deleted."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vitreg_jax import checkpoint


def _state(step: int) -> dict:
  return {'w': jnp.full((64, 64), float(step)), 'b': jnp.arange(8.0) + step}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _damage(step_dir: str) -> None:
  """Truncates the step's array data files (OCDBT ``d/`` chunks), as a crash mid-write would."""
  chunks = [os.path.join(root, name) for root, _, files in os.walk(os.path.join(step_dir, 'state'))
            if os.path.basename(root) == 'd' for name in files]
  assert chunks, f'no data chunks under {step_dir}'
  for path in chunks:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 3)


def _saved_run(directory) -> checkpoint.RunCheckpointer:
  ckpt = checkpoint.RunCheckpointer(str(directory), save_every=1, keep=5, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), None, ml_collections.ConfigDict({'step': step}))
  ckpt.wait()
  return ckpt


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  _saved_run(tmp_path).close()
  _damage(os.path.join(tmp_path, '3'))
  ckpt = checkpoint.RunCheckpointer(str(tmp_path), save_every=1, keep=5)
  with caplog.at_level('WARNING'):
    state, step = ckpt.restore(_abstract(_state(0)), None)
  assert step == 2
  np.testing.assert_array_equal(state['w'], np.full((64, 64), 2.0))
  np.testing.assert_array_equal(state['b'], np.arange(8.0) + 2)
  assert 'step 3' in caplog.text and 'unreadable' in caplog.text
  assert os.path.isdir(os.path.join(tmp_path, '3'))  # kept for a human to look at
  with pytest.raises(Exception):  # an explicitly asked-for step is not replaced
    ckpt.restore(_abstract(_state(0)), None, step=3)
  ckpt.close()


def test_no_readable_checkpoint_names_the_directory_and_steps(tmp_path):
  _saved_run(tmp_path).close()
  for step in ('1', '2', '3'):
    _damage(os.path.join(tmp_path, step))
  ckpt = checkpoint.RunCheckpointer(str(tmp_path), save_every=1, keep=5)
  with pytest.raises(RuntimeError, match=r'no readable checkpoint in .*tried steps \[3, 2, 1\]'):
    ckpt.restore(_abstract(_state(0)), None)
  ckpt.close()


def test_a_resuming_run_sets_the_damaged_step_aside_and_saves_it_again(tmp_path):
  directory = tmp_path / 'checkpoints'
  _saved_run(directory).close()
  _damage(os.path.join(directory, '3'))
  ckpt = checkpoint.RunCheckpointer(str(directory), save_every=1, keep=5, async_save=False)
  _, step = ckpt.restore(_abstract(_state(0)), None, set_aside_unreadable=True)
  assert step == 2
  assert os.path.isdir(tmp_path / 'checkpoints.unreadable' / '3')  # moved, not deleted
  assert ckpt.save(3, _state(30), None, ml_collections.ConfigDict({'step': 3}))
  ckpt.wait()
  state, step = ckpt.restore(_abstract(_state(0)), None)
  assert step == 3 and float(state['w'][0, 0]) == 30.0
  ckpt.close()
