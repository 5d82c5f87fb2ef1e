"""Mesh, rules, batches and the sharded DeiT-III step on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import parallel_worker
from vitreg_jax import recipes
from vitreg_jax.parallel import batch as batch_lib
from vitreg_jax.parallel import mesh as mesh_lib
from vitreg_jax.parallel import rules as rules_lib

GLOBAL_BATCH = 16
STRATEGY_MESHES = {
    'dp': {'data': 8, 'fsdp': 1, 'tensor': 1},
    'fsdp': {'data': 2, 'fsdp': 4, 'tensor': 1},
    'fsdp_tp': {'data': 2, 'fsdp': 2, 'tensor': 2},
}


def mesh(data=1, fsdp=1, tensor=1, devices=None):
  return mesh_lib.create_mesh({'data': data, 'fsdp': fsdp, 'tensor': tensor}, devices)


def config(strategy='dp', mesh_axes=None):
  """Smoke ViT (D=32, 2 scanned blocks, 4 heads, MLP 128, 10 classes), lr from step 0."""
  c = parallel_worker.load_config('smoke')
  c.model.update(scan_blocks=True, embed_dim=32, depth=2, num_heads=4, num_registers=2)
  c.classifier.num_classes = 10
  c.mixing.label_smoothing = 0.1
  c.data.batch_size = GLOBAL_BATCH
  c.optim.warmup_epochs = 0
  c.mesh.update(mesh_axes or {'data': 1, 'fsdp': 1, 'tensor': 1})
  c.sharding.strategy = strategy
  return c


# --- mesh ------------------------------------------------------------------

def test_mesh_shape_fills_minus_one_and_uses_auto_axes():
  assert mesh_lib.resolve_mesh_shape({'data': -1, 'tensor': 2}, 8) == (4, 1, 2)
  assert mesh_lib.resolve_mesh_shape({'fsdp': -1}, 64) == (1, 64, 1)
  m = mesh(data=2, fsdp=2, tensor=2)
  assert m.axis_names == ('data', 'fsdp', 'tensor')
  assert dict(m.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert m.axis_types == (AxisType.Auto,) * 3
  # Innermost axis = consecutive devices (one host on CPU/GPU).
  assert [d.id for d in m.devices[0, 0]] == [0, 1]


@pytest.mark.parametrize('axes, match', [
    ({'data': 3, 'fsdp': 2}, 'needs 6 devices but 8 are available'),
    ({'data': -1, 'fsdp': 3}, '8 devices are not divisible by .* product 3'),
    ({'data': -1, 'fsdp': -1}, 'at most one axis may be -1'),
    ({'data': 0}, 'positive or -1'),
    ({'model': 8}, r"unknown axes \['model'\]"),
])
def test_mesh_that_does_not_match_devices_fails_naming_numbers(axes, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.create_mesh(axes)


# --- rules -----------------------------------------------------------------

def test_rule_tables_map_logical_names_as_documented():
  m = mesh(data=2, fsdp=2, tensor=2)
  fsdp, tp = rules_lib.get_rules('fsdp'), rules_lib.get_rules('fsdp_tp')
  spec = lambda names, shape, rules: rules_lib.partition_spec(names, shape, rules, m)
  # Activations: batch over data x fsdp; embed then stays whole (fsdp is taken).
  assert spec(('batch', 'tokens', 'embed'), (8, 5, 32), fsdp) == P(('data', 'fsdp'), None, None)
  assert spec(('batch', 'tokens', 'embed'), (8, 5, 32), rules_lib.get_rules('dp')) == P(
      ('data', 'fsdp'), None, None)
  # Params under fsdp: embed over fsdp, nothing over tensor.
  assert spec(('embed', 'mlp'), (32, 128), fsdp) == P('fsdp', None)
  assert spec(('embed', None, 'heads', 'head_dim'), (32, 3, 4, 8), fsdp) == P(
      'fsdp', None, None, None)
  # fsdp_tp: Megatron split of heads / mlp, embed over fsdp.
  assert spec(('embed', None, 'heads', 'head_dim'), (32, 3, 4, 8), tp) == P(
      'fsdp', None, 'tensor', None)
  assert spec(('mlp', 'embed'), (128, 32), tp) == P('tensor', 'fsdp')
  assert spec(('layers', 'embed', 'mlp'), (2, 32, 128), tp) == P(None, 'fsdp', 'tensor')
  # DINO prototypes / CLIP vocab: over fsdp x tensor in params, tensor in activations.
  assert spec((None, 'prototypes'), (256, 65536), tp) == P(None, ('fsdp', 'tensor'))
  assert spec((None, 'prototypes'), (256, 65536), fsdp) == P(None, 'fsdp')
  assert spec(('batch', 'prototypes'), (8, 65536), tp) == P(('data', 'fsdp'), 'tensor')
  assert spec(('vocab', 'embed'), (49408, 32), tp) == P(('fsdp', 'tensor'), None)


def test_rules_skip_dims_that_do_not_divide_and_reassign_the_mesh_axis():
  m = mesh(fsdp=8)
  fsdp = rules_lib.get_rules('fsdp')
  # embed=12 cannot split 8 ways: fsdp moves to mlp (ViT-S on 256 chips: 384 vs 1536).
  assert rules_lib.partition_spec(('embed', 'mlp'), (12, 64), fsdp, m) == P(None, 'fsdp')
  assert rules_lib.partition_spec(('embed', 'classes'), (12, 10), fsdp, m) == P(None, None)
  # A joint (data, fsdp) batch axis keeps the leading part that divides.
  m2 = mesh(data=2, fsdp=4)
  assert rules_lib.partition_spec(('batch',), (6,), fsdp, m2) == P('data')


def test_rules_reject_unknown_names_and_idle_tensor_axis():
  with pytest.raises(ValueError, match=r"unknown logical axis names \['embd'\]"):
    rules_lib.partition_spec(('embd',), (8,), rules_lib.get_rules('fsdp'), mesh(fsdp=8))
  with pytest.raises(ValueError, match='unknown sharding strategy .*valid'):
    rules_lib.get_rules('zero3')
  with pytest.raises(ValueError, match="does not use the mesh's tensor axis"):
    rules_lib.validate_strategy('fsdp', mesh(fsdp=4, tensor=2))


# --- batches ---------------------------------------------------------------

def test_batch_layout_and_global_batch_single_process():
  m = mesh(data=2, fsdp=2, tensor=2)
  rules = rules_lib.get_rules('fsdp_tp')
  layout = batch_lib.batch_layout(m, rules, 16)
  assert (layout.batch_shards, layout.per_process_batch_size, layout.num_shards) == (4, 16, 1)
  assert layout.blocks == ((0, 16),) and layout.shard_index == 0
  np.testing.assert_array_equal(layout.rows(), np.arange(16))
  local = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  shardings = batch_lib.batch_shardings({'x': ('batch', None)}, local, m, rules)
  out = batch_lib.global_batch(local, layout, shardings)['x']
  assert out.shape == (16, 3) and out.sharding.spec == P(('data', 'fsdp'), None)
  assert {s.data.shape for s in out.addressable_shards} == {(4, 3)}
  np.testing.assert_array_equal(np.asarray(out), local['x'])


def test_process_blocks_merge_touching_device_rows():
  """Rows per process from a sharding: touching device blocks merge, others stay apart."""
  m = mesh(fsdp=8)
  sharding = NamedSharding(m, P('fsdp'))
  assert batch_lib.process_blocks(sharding, 32) == {0: ((0, 32),)}
  layout = batch_lib.BatchLayout(32, 8, ((0, 4), (16, 20)), 0, 4)
  assert layout.per_process_batch_size == 8
  np.testing.assert_array_equal(layout.rows(), [0, 1, 2, 3, 16, 17, 18, 19])
  np.testing.assert_array_equal(layout.local_rows(np.arange(32) * 10), layout.rows() * 10)


def test_batch_that_does_not_divide_fails_naming_numbers():
  m = mesh(data=2, fsdp=4)
  with pytest.raises(ValueError, match=r'global batch size 12 does not divide over the 8 batch '
                                       r'shards .*data=2 x fsdp=4.*multiple of 8, e.g. 8 or 16'):
    batch_lib.batch_layout(m, rules_lib.get_rules('fsdp'), 12)
  layout = batch_lib.batch_layout(m, rules_lib.get_rules('fsdp'), 16)
  with pytest.raises(ValueError, match=r"'labels' has shape \(15,\).*expected 16 rows"):
    batch_lib.global_batch({'labels': np.zeros(15)}, layout, {})


def test_start_up_fails_on_bad_mesh_or_batch():
  with pytest.raises(ValueError, match='needs 4 devices but 8 are available'):
    recipes.sharded(config('fsdp', {'data': 1, 'fsdp': 4, 'tensor': 1}))
  trainer = recipes.sharded(config('dp', {'data': 8, 'fsdp': 1, 'tensor': 1}))
  with pytest.raises(ValueError, match='global batch size 20 does not divide over the 8'):
    trainer.lower(20)


# --- the sharded DeiT-III step -----------------------------------------------

def _batch(step):
  rng = np.random.default_rng(step)
  labels = rng.integers(0, 10, GLOBAL_BATCH)
  return {'image': rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
          'targets': (np.eye(10)[labels] * 0.9 + 0.01).astype(np.float32)}


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _run_steps(trainer, state, steps=2):
  losses = []
  for step in range(steps):
    state, metrics = trainer.train_step(state, trainer.global_batch(_batch(step), GLOBAL_BATCH),
                                        jax.random.key(7))
    losses.append(float(metrics['loss']))
  return state, losses


@pytest.fixture(scope='module')
def single_device():
  """Init and two steps on one device: the reference for every strategy."""
  trainer = recipes.sharded(config('dp'), jax.devices()[:1])
  state = trainer.init(jax.random.key(0))
  init_state = _to_numpy(state)
  state, losses = _run_steps(trainer, state)
  return {'init_state': init_state, 'params': _to_numpy(state.params), 'losses': losses}


# Per-device shard shapes each strategy must produce (2 scanned blocks, D=32,
# 4 heads of 8, MLP 128, 10 classes).
EXPECTED_SHARDS = {
    'dp': {
        ('backbone', 'blocks', 'attn', 'qkv', 'kernel'): (2, 32, 3, 4, 8),
        ('backbone', 'blocks', 'mlp', 'fc1', 'kernel'): (2, 32, 128),
        ('backbone', 'pos_embed'): (1, 17, 32),
        ('head', 'kernel'): (32, 10),
    },
    'fsdp': {
        ('backbone', 'blocks', 'attn', 'qkv', 'kernel'): (2, 8, 3, 4, 8),
        ('backbone', 'blocks', 'attn', 'proj', 'kernel'): (2, 4, 8, 8),
        ('backbone', 'blocks', 'mlp', 'fc1', 'kernel'): (2, 8, 128),
        ('backbone', 'blocks', 'mlp', 'fc2', 'kernel'): (2, 128, 8),
        ('backbone', 'blocks', 'norm1', 'scale'): (2, 8),
        ('backbone', 'patch_embed', 'proj', 'kernel'): (8, 8, 3, 8),
        ('backbone', 'pos_embed'): (1, 17, 8),
        ('head', 'kernel'): (8, 10),
        ('head', 'bias'): (10,),  # 10 classes do not split 4 ways
    },
    'fsdp_tp': {
        ('backbone', 'blocks', 'attn', 'qkv', 'kernel'): (2, 16, 3, 2, 8),
        ('backbone', 'blocks', 'attn', 'qkv', 'bias'): (2, 3, 2, 8),
        ('backbone', 'blocks', 'attn', 'proj', 'kernel'): (2, 2, 8, 16),
        ('backbone', 'blocks', 'mlp', 'fc1', 'kernel'): (2, 16, 64),
        ('backbone', 'blocks', 'mlp', 'fc2', 'kernel'): (2, 64, 16),
        ('backbone', 'pos_embed'): (1, 17, 16),
        ('head', 'kernel'): (16, 5),
        ('head', 'bias'): (5,),
    },
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _shard_shapes(array):
  return {s.data.shape for s in array.addressable_shards}


def _assert_sharded_as_expected(state, strategy):
  for path, shard in EXPECTED_SHARDS[strategy].items():
    param = _get(state.params, path)
    assert _shard_shapes(param) == {shard}, (strategy, path, param.sharding.spec)
    # Adam moments (and any params-shaped optimizer leaf) follow their param.
    moments = [leaf for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if tuple(getattr(k, 'key', None) for k in leaf_path[-len(path):]) == path]
    assert len(moments) == 2, (path, len(moments))
    assert all(_shard_shapes(m) == {shard} for m in moments), (strategy, path)


@pytest.mark.parametrize('strategy', sorted(STRATEGY_MESHES))
def test_strategy_matches_single_device_and_shards_params(strategy, single_device):
  trainer = recipes.sharded(config(strategy, STRATEGY_MESHES[strategy]))
  state = jax.device_put(single_device['init_state'], trainer.state_shardings)
  _assert_sharded_as_expected(state, strategy)
  state, losses = _run_steps(trainer, state)
  _assert_sharded_as_expected(state, strategy)  # the step keeps the layout
  np.testing.assert_allclose(losses, single_device['losses'], rtol=0, atol=1e-5)
  params = _to_numpy(state.params)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(single_device['params'])):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # The two steps really changed the parameters.
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), single_device['params'],
                       single_device['init_state'].params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_sharded_init_is_born_sharded_and_equals_single_device_init(single_device):
  trainer = recipes.sharded(config('fsdp_tp', STRATEGY_MESHES['fsdp_tp']))
  state = trainer.init(jax.random.key(0))
  _assert_sharded_as_expected(state, 'fsdp_tp')
  assert int(state.step) == 0
  got, want = _to_numpy(state), single_device['init_state']
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# --- multi-process start-up ---------------------------------------------------

def test_distributed_initialize_validates_before_starting(monkeypatch):
  from vitreg_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
              'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed.glob, 'glob', lambda pattern: [])  # no TPU device files
  assert distributed.detect_cluster() is None
  assert distributed.initialize('auto') is False  # single process: nothing to do
  assert distributed.initialize('off', '127.0.0.1:1', 2, 0) is False
  assert distributed.initialize('auto', '127.0.0.1:1', 1, 0) is False  # one process
  with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
    distributed.initialize('auto', coordinator_address='127.0.0.1:1')
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.initialize('auto')
  with pytest.raises(ValueError, match='valid'):
    distributed.initialize('maybe')
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert distributed.detect_cluster() == 'slurm'
