"""Pipelines: exact resume (with workers, through Orbax), multi-process sharding, global arrays."""

import contextlib
import signal

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

import data_testing

from vitreg_jax import config as config_lib
from vitreg_jax.data import multicrop, pipeline
from vitreg_jax.data import tokenizer




@contextlib.contextmanager
def time_limit(seconds):
  """Fails a test instead of hanging it (worker processes are involved)."""
  def expire(signum, frame):
    raise TimeoutError(f'exceeded {seconds} s')
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _config(trainer='multicrop', **data):
  config = ml_collections.ConfigDict()
  config.kind, config.seed = trainer, 0
  config.data = {'source': 'embedded', 'embedded': dict(image_size=40, num_train=64, num_val=21),
                 'batch_size': 8, **data}
  config.augment = dict(global_crops_size=28, local_crops_size=14, local_crops_number=2, image_size=28)
  config.masking = dict(patch_size=7)
  return config


def _take(iterator, n):
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_with_workers_through_orbax_matches_uninterrupted(tmp_path):
  k, m = 3, 4
  uninterrupted = data_testing.train_pipeline(_config(), process_index=0, process_count=1)
  expected = _take(uninterrupted, k + m)
  uninterrupted.close()
  manager = ocp.CheckpointManager(tmp_path)
  with time_limit(120):
    first = data_testing.train_pipeline(_config(num_workers=2), process_index=0, process_count=1)
    _assert_same(_take(first, k), expected[:k])
    manager.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(first)))
    manager.wait_until_finished()
    first.close()
    resumed = data_testing.train_pipeline(_config(num_workers=2), process_index=0, process_count=1)
    manager.restore(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert resumed.get_state()['next_batch'] == k
    _assert_same(_take(resumed, m), expected[k:])
    resumed.close()
  manager.close()


def test_resume_on_a_mesh_with_device_prefetch():
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  config = _config(device_prefetch=3)
  iterator = data_testing.train_pipeline(config, process_index=0, process_count=1, mesh=mesh)
  first = next(iterator)
  assert isinstance(first['global_crops'], jax.Array)
  assert first['global_crops'].sharding.spec == jax.sharding.PartitionSpec(('data',))
  assert first['global_crops'].shape == (8, 2, 28, 28, 3)
  _take(iterator, 1)
  state = iterator.get_state()  # 2 batches returned; 3 more are already on the devices
  expected = _take(iterator, 2)
  iterator.close()
  resumed = data_testing.train_pipeline(config, process_index=0, process_count=1, mesh=mesh)
  resumed.set_state(state)
  _assert_same(_take(resumed, 2), expected)
  resumed.close()
  # The same stream without a mesh: device placement does not change the data.
  plain = data_testing.train_pipeline(config, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(plain)['global_crops'], np.asarray(first['global_crops']))
  plain.close()


def test_two_processes_cover_each_example_once_per_epoch():
  per_process_batches = 64 // 8  # 32 examples per process, 4 per process batch
  epochs = {0: [], 1: []}
  for process in (0, 1):
    iterator = data_testing.train_pipeline(_config(), process_index=process, process_count=2)
    indices = np.concatenate([b['index'] for b in _take(iterator, 2 * per_process_batches)])
    iterator.close()
    epochs[0].append(indices[:32])
    epochs[1].append(indices[32:])
  for epoch in epochs.values():
    assert sorted(np.concatenate(epoch)) == list(range(64))  # disjoint and complete
  assert not np.array_equal(epochs[0][0], epochs[1][0])  # reshuffled each epoch


def test_streams_are_reproducible_and_independent():
  def first_batch(**kwargs):
    iterator = data_testing.train_pipeline(_config(), process_count=1, **kwargs)
    batch = next(iterator)
    iterator.close()
    return batch
  a, b = first_batch(process_index=0, seed=5), first_batch(process_index=0, seed=5)
  _assert_same([a], [b])
  c = first_batch(process_index=0, seed=6)
  assert not np.array_equal(a['index'], c['index'])
  # Without shuffling, a different seed still changes the augmentation.
  config = _config(shuffle=False)
  d = data_testing.train_pipeline(config, process_index=0, process_count=1, seed=1)
  e = data_testing.train_pipeline(config, process_index=0, process_count=1, seed=2)
  x, y = next(d), next(e)
  d.close(), e.close()
  np.testing.assert_array_equal(x['index'], y['index'])
  assert not np.array_equal(x['global_crops'], y['global_crops'])


def test_masks_follow_the_recipe_within_each_batch():
  config = _config(batch_size=32)
  config.augment.global_crops_size = 56  # an 8 x 8 patch grid
  iterator = data_testing.train_pipeline(config, process_index=0, process_count=1)
  masks = next(iterator)['masks']
  iterator.close()
  assert masks.shape == (32, 2, 8, 8) and masks.dtype == bool
  ratios = masks.reshape(64, -1).mean(-1)
  assert np.sum(ratios > 0) == 32  # half of the 64 global crops are masked
  masked = np.sort(ratios[ratios > 0])
  bounds = np.linspace(0.1, 0.5, 33)
  assert np.all(masked <= 0.5)
  # Stratified: the k-th smallest ratio is close to the k-th bin (blocks may fall short).
  assert np.mean(np.abs(masked - (bounds[:-1] + bounds[1:]) / 2)) < 0.03


def test_clip_tokens_are_the_captions():
  config = _config('image_text', shuffle=False)
  iterator = data_testing.train_pipeline(config, process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  from vitreg_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.make_source(pipeline.section(config, 'data', config_lib.DATA), 'train')
  tok = tokenizer.ClipTokenizer()
  for row, index in enumerate(batch['index']):
    assert tok.decode(batch['tokens'][row]) == source[int(index)]['caption']
  assert batch['image'].shape == (8, 28, 28, 3)


def test_corrupt_files_are_skipped_and_counted(tmp_path):
  for label in ('a', 'b'):
    folder = tmp_path / label
    folder.mkdir()
    for i in range(8):
      Image.new('RGB', (20, 16), (40 * i, 90, 200)).save(folder / f'{i}.png')
  (tmp_path / 'a' / '3.png').write_bytes(b'not a png')
  (tmp_path / 'b' / '5.png').write_bytes(Image.new('RGB', (20, 16)).tobytes()[:40])
  config = _config(source='folder', path=str(tmp_path), shuffle=False, num_epochs=1)
  iterator = data_testing.train_pipeline(config, process_index=0, process_count=1)
  batches = _take(iterator, 2)
  with pytest.raises(StopIteration):
    next(iterator)
  iterator.close()
  assert sum(int(b['skipped'].sum()) for b in batches) == 2
  assert all(np.isfinite(b['global_crops']).all() for b in batches)


def test_eval_covers_each_example_once_across_processes():
  config = _config()
  seen, valid = [], 0
  for process in (0, 1):
    evaluation = pipeline.build_eval_pipeline(config, split='val', process_index=process, process_count=2)
    batches = list(evaluation)
    assert len(batches) == evaluation.num_batches == 3  # ceil(21 / 8), the same on both processes
    for batch in batches:
      assert batch['image'].shape == (4, 224, 224, 3)
      seen.extend(batch['index'][batch['valid'] == 1])
      valid += int(batch['valid'].sum())
  assert sorted(seen) == list(range(21)) and valid == 21


def test_global_batch_and_config_errors():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  batch = {'x': np.arange(16).reshape(8, 2), 'y': np.ones(8, np.int32)}
  global_batch = pipeline.to_global_batch(batch, mesh)
  np.testing.assert_array_equal(np.asarray(global_batch['x']), batch['x'])
  assert len(global_batch['x'].addressable_shards) == 8
  with pytest.raises(ValueError, match='none of the batch axes'):
    pipeline.batch_sharding(mesh, ('fsdp',))
  config = _config()
  config.data.batch_sizes = 3
  with pytest.raises(ValueError, match=r"unknown config key data.batch_sizes; valid"):
    data_testing.train_pipeline(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='divisible'):
    data_testing.train_pipeline(_config(batch_size=9), process_index=0, process_count=2)
  config = _config()
  config.augment.blur_probz = 0.5
  with pytest.raises(ValueError, match='unknown config key augment.blur_probz'):
    pipeline.build_train_pipeline(config, multicrop.MultiCropBatches(config))


def test_restoring_a_different_stream_fails_clearly():
  iterator = data_testing.train_pipeline(_config(), process_index=0, process_count=1)
  state = iterator.get_state()
  iterator.close()
  other = data_testing.train_pipeline(_config(), process_index=0, process_count=1, seed=9)
  with pytest.raises(ValueError, match='different data stream'):
    other.set_state(state)
  other.close()
