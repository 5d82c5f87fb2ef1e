"""The loaders read the data shard the batch layout names, not ``jax.process_index()``."""

import jax
import ml_collections
import numpy as np
import data_testing
import pytest

from vitreg_jax.data import pipeline
from vitreg_jax.parallel import mesh as mesh_lib




def _config(**data):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = {'source': 'embedded', 'embedded': dict(image_size=40, num_train=64, num_val=21),
                 'batch_size': 8, **data}
  config.augment = dict(global_crops_size=28, local_crops_size=14, local_crops_number=2)
  config.masking = dict(patch_size=7)
  return config


def _first(**kwargs):
  iterator = data_testing.train_pipeline(_config(), **kwargs)
  try:
    return iterator.description, {k: np.asarray(v) for k, v in next(iterator).items()}
  finally:
    iterator.close()


def test_shard_arguments_select_the_examples_and_seeds():
  description, batch = _first(shard_index=1, num_shards=2)
  old_description, old_batch = _first(process_index=1, process_count=2)  # the older names
  assert description == old_description and 'process 1/2' in description
  for key in batch:
    np.testing.assert_array_equal(batch[key], old_batch[key], err_msg=key)
  assert batch['global_crops'].shape[0] == 4  # 8 over 2 shards
  assert set(batch['index']) <= set(range(1, 64, 2))  # shard 1 of 2: odd examples
  _, other = _first(shard_index=0, num_shards=2)
  assert not set(other['index']) & set(batch['index'])


@pytest.mark.parametrize('kwargs, match', [
    (dict(shard_index=0, num_shards=2, process_index=0, process_count=2), 'not both'),
    (dict(shard_index=1), 'go together'),
    (dict(shard_index=2, num_shards=2), r'outside \[0, num_shards=2\)'),
    (dict(shard_index=0, num_shards=3), r'data.batch_size \(8\) must be divisible by the number '
                                        r'of data shards \(3\)'),
])
def test_bad_shard_arguments_fail_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data_testing.train_pipeline(_config(), **kwargs)


def test_mesh_gives_the_default_shard():
  """One process holds every row of any mesh here: shard 0 of 1, the whole batch."""
  mesh = mesh_lib.create_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  iterator = data_testing.train_pipeline(_config(), mesh=mesh)
  try:
    assert 'process 0/1' in iterator.description
    assert next(iterator)['global_crops'].shape[0] == 8
  finally:
    iterator.close()
  evaluation = pipeline.build_eval_pipeline(_config(), split='val', mesh=mesh)
  assert len(evaluation) == 3  # 21 examples in batches of 8, all read by this one shard
  assert jax.process_count() == 1
