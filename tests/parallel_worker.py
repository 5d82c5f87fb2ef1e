"""Runs a few DeiT-III train steps through the real pipeline, in one process or as one of several.

Used by tests/test_parallel_multiprocess.py both in-process (the single-process
reference) and as ``python tests/parallel_worker.py`` children that join a
``jax.distributed`` run on 127.0.0.1. Each process reads the data shard its
``BatchLayout`` names, through the recipe's batch function, and feeds the rows
its devices hold. The reference reads every shard the two processes read
(standing in for them: devices 0, 1 as process 0, devices 2, 3 as process 1)
and assembles the same global batch.

Each scenario is a mesh over two processes x two devices. ``ORDERS`` name the
device at each mesh position as (process, local device), so a scenario can lay
the batch out as a TPU torus does: several row blocks per process, or a
``tensor`` axis across processes. The single-process reference runs the same
mesh shapes on its four devices (same program, other devices).
"""

import argparse
import hashlib
import json
import pathlib
import sys

from vitreg_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
STEPS = 3
DEVICES_PER_PROCESS = 2
# Mesh positions in row-major order of (data, fsdp, tensor) -> (process, local device).
ORDERS = {
    'process_major': None,  # create_mesh's own order: fsdp across processes, tensor within
    'interleaved': ((0, 0), (1, 0), (0, 1), (1, 1)),    # rows 0-2 + 4-6 | 2-4 + 6-8
    'tensor_across': ((0, 0), (1, 0), (0, 1), (1, 1)),  # tensor pairs span both processes
}
SCENARIOS = {  # name -> (mesh, strategy)
    'process_major': ({'data': 1, 'fsdp': 2, 'tensor': 2}, 'fsdp_tp'),
    'interleaved': ({'data': 1, 'fsdp': 4, 'tensor': 1}, 'fsdp'),
    'tensor_across': ({'data': 1, 'fsdp': 2, 'tensor': 2}, 'fsdp_tp'),
}
# Trained in every process (a train-step compile each); the others only lay out the batch.
TRAINED = ('interleaved', 'tensor_across')
# rbg compiles ~4x faster than threefry on CPU; both runs use the same program.
INIT_PRNG = 'unsafe_rbg'
# Set in every compared process (same program, same numerics); cuts compile time ~3x.
XLA_FLAGS = '--xla_backend_optimization_level=0'


def load_config(arg: str = 'smoke', file: str = 'deit3_reg.py'):
  """``configs/FILE:ARG`` (configs/ is no package)."""
  return config_lib.from_file(REPO / 'configs' / file, arg)


def test_config(mesh=None, strategy='fsdp_tp'):
  config = load_config('smoke')
  config.data.batch_size = GLOBAL_BATCH
  config.optim.warmup_epochs = 0
  config.mesh.update(mesh or SCENARIOS['process_major'][0])
  config.sharding.strategy = strategy
  return config


def _stand_in_process(device) -> int:
  """The process a device belongs to, or stands in for in the one-process reference."""
  import jax  # pylint: disable=import-outside-toplevel
  return device.process_index if jax.process_count() > 1 else device.id // DEVICES_PER_PROCESS


def pipeline_batches(config, trainer):
  """``STEPS`` global batches as the two-process run reads them, through the real pipeline.

  Each (stand-in) process's loader reads the data shard its layout names and
  yields its blocks' rows; in the reference, one process reads both shards.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vitreg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from vitreg_jax.parallel import batch as batch_lib  # pylint: disable=import-outside-toplevel
  processes = sorted({_stand_in_process(d) for d in trainer.mesh.devices.flat})
  layouts = {p: batch_lib.batch_layout(trainer.mesh, trainer.rules, GLOBAL_BATCH, p,
                                       _stand_in_process) for p in processes}
  own = trainer.batch_layout(GLOBAL_BATCH)
  readers = {}
  for p, layout in layouts.items():
    if layout.shard_index not in readers:
      readers[layout.shard_index] = pipeline.build_train_pipeline(
          config, trainer.recipe.host_batches, layout=layout)
  try:
    for _ in range(STEPS):
      rows = {shard: next(reader) for shard, reader in readers.items()}
      whole = {}
      for layout in layouts.values():
        local = rows[layout.shard_index]
        for key in trainer.recipe.batch_spec:
          out = whole.setdefault(key, np.zeros((GLOBAL_BATCH,) + local[key].shape[1:],
                                               local[key].dtype))
          out[layout.rows()] = local[key]
      yield {k: own.local_rows(v) for k, v in whole.items()}
  finally:
    for reader in readers.values():
      reader.close()


def scenario_trainer(name: str):
  """The scenario's ``ShardedRecipe``: its mesh in the scenario's device order."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType, Mesh  # pylint: disable=import-outside-toplevel
  from vitreg_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from vitreg_jax.parallel import rules  # pylint: disable=import-outside-toplevel
  from vitreg_jax import recipes  # pylint: disable=import-outside-toplevel
  from vitreg_jax.train import sharded  # pylint: disable=import-outside-toplevel

  mesh_axes, strategy = SCENARIOS[name]
  config = test_config(mesh_axes, strategy)
  if ORDERS[name] is None:
    return config, sharded.ShardedRecipe.from_config(recipes.build(config), config)
  if jax.process_count() > 1:
    local = lambda p: sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
    by_position = {(p, i): d for p in range(jax.process_count()) for i, d in enumerate(local(p))}
  else:  # the reference stands in for both: devices 0, 1 as process 0, devices 2, 3 as 1
    by_position = {divmod(d.id, DEVICES_PER_PROCESS): d for d in jax.devices()}
  devices = np.array([by_position[p] for p in ORDERS[name]], dtype=object)
  shape = mesh_lib.resolve_mesh_shape(mesh_axes, devices.size)
  mesh = Mesh(devices.reshape(shape), mesh_lib.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(mesh_lib.MESH_AXES))
  rules.validate_strategy(strategy, mesh)
  return config, sharded.ShardedRecipe(recipes.build(config), mesh,
                                       rules.get_rules(strategy))


def loader_digest(shard_index: int, num_shards: int) -> str:
  """Digest of the first DINOv2 batch a loader reading this data shard yields."""
  from vitreg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = load_config('smoke', 'dinov2_reg.py')
  config.data.batch_size = GLOBAL_BATCH
  config.group_size = GLOBAL_BATCH // 2  # divides every per-process batch here
  from vitreg_jax.data import multicrop  # pylint: disable=import-outside-toplevel
  iterator = pipeline.build_train_pipeline(config, multicrop.MultiCropBatches(config),
                                           shard_index=shard_index, num_shards=num_shards, seed=0)
  try:
    batch = next(iterator)
  finally:
    iterator.close()
  digest = hashlib.sha256()
  for key in sorted(batch):
    digest.update(key.encode() + batch[key].tobytes())
  return digest.hexdigest()[:16]


def initial_state():
  """The initial state as numpy, computed on one local device: every mesh starts from it."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vitreg_jax import recipes  # pylint: disable=import-outside-toplevel
  from vitreg_jax.train import state  # pylint: disable=import-outside-toplevel
  recipe = recipes.build(test_config())
  init = jax.jit(lambda key: state.unbox(recipe.init_state(key)),
                 out_shardings=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return jax.tree.map(np.asarray, init(jax.random.key(0, impl=INIT_PRNG)))


def run_scenario(name: str, init_state=None) -> dict:
  """This process's row blocks and data shard; with ``init_state``, ``STEPS`` steps' losses."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  config, trainer = scenario_trainer(name)
  layout = trainer.batch_layout(GLOBAL_BATCH)
  tensor = trainer.mesh.shape['tensor']
  out = {'blocks': [list(b) for b in layout.blocks],
         'shard': [layout.shard_index, layout.num_shards],
         'tensor_groups_processes': [sorted({d.process_index for d in group}) for group in
                                     trainer.mesh.devices.reshape(-1, tensor)]}
  if init_state is None:
    return out
  state = jax.device_put(init_state, trainer.state_shardings)
  losses = []
  for local in pipeline_batches(config, trainer):
    state, metrics = trainer.train_step(state, trainer.global_batch(local, GLOBAL_BATCH),
                                        jax.random.key(1))
    losses.append(float(metrics['loss']))
  param_norm = jax.jit(optax.tree.norm, out_shardings=trainer.replicated)(state.params)
  return dict(out, losses=losses, param_norm=float(jnp.asarray(param_norm)))


def run(trained=TRAINED) -> dict:
  """Every scenario's layout and loader shard; training for those in ``trained``."""
  import jax  # pylint: disable=import-outside-toplevel
  out = {'process_count': jax.process_count(), 'device_count': jax.device_count()}
  init_state = initial_state()
  digests = {}
  for name in SCENARIOS:
    out[name] = run_scenario(name, init_state if name in trained else None)
    shard = tuple(out[name]['shard'])
    if shard not in digests:
      digests[shard] = loader_digest(*shard)
    out[name]['loader'] = digests[shard]
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  sys.path.insert(0, str(REPO))
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_default_matmul_precision', 'highest')
  from vitreg_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
  initialized = distributed.initialize('auto', args.coordinator_address, args.num_processes,
                                       args.process_id)
  result = run()
  result['initialized'] = initialized
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(result, f)


if __name__ == '__main__':
  main()
