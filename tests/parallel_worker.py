"""Runs a few supervised train steps, in one process or as one of several.

Used by tests/test_parallel_multiprocess.py both in-process (the single-process
reference) and as ``python tests/parallel_worker.py`` children that join a
``jax.distributed`` run on 127.0.0.1. Every process draws the same global
batch from a fixed seed and feeds only the rows its devices hold.
"""

import argparse
import importlib.util
import json
import pathlib
import sys

CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'supervised.py'
GLOBAL_BATCH = 8
STEPS = 3
MESH = {'data': 1, 'fsdp': 2, 'tensor': 2}
STRATEGY = 'fsdp_tp'
# rbg compiles ~4x faster than threefry on CPU; both runs use the same program.
INIT_PRNG = 'unsafe_rbg'
# Set in every compared process (same program, same numerics); cuts compile time ~3x.
XLA_FLAGS = '--xla_backend_optimization_level=0'


def load_config(arg: str = 'smoke'):
  spec = importlib.util.spec_from_file_location('supervised_config', CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_config():
  config = load_config('smoke')
  config.input.global_batch_size = GLOBAL_BATCH
  config.optimizer.warmup_steps = 0
  config.mesh.update(MESH)
  config.sharding.strategy = STRATEGY
  return config


def global_batches(num_classes: int, image_size: int):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    yield {'images': rng.normal(size=(GLOBAL_BATCH, image_size, image_size, 3)).astype(np.float32),
           'labels': rng.integers(0, num_classes, GLOBAL_BATCH).astype(np.int32)}


def run(devices=None) -> dict:
  """Losses of ``STEPS`` steps and this process's batch rows."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from vitreg_jax.train import sharded  # pylint: disable=import-outside-toplevel

  config = test_config()
  trainer = sharded.from_config(config, devices)
  layout = trainer.batch_layout(GLOBAL_BATCH)
  state = trainer.init(jax.random.key(0, impl=INIT_PRNG))
  losses = []
  for batch in global_batches(config.num_classes, config.input.image_size):
    local = {k: v[layout.process_start:layout.process_stop] for k, v in batch.items()}
    state, metrics = trainer.train_step(state, trainer.global_batch(local, GLOBAL_BATCH),
                                        jax.random.key(1))
    losses.append(float(metrics['loss']))
  param_norm = jax.jit(optax.tree.norm, out_shardings=trainer.replicated)(state.params)
  return {'losses': losses, 'param_norm': float(jnp.asarray(param_norm)),
          'rows': [layout.process_start, layout.process_stop],
          'process_count': jax.process_count(), 'device_count': jax.device_count(),
          'tensor_groups_processes': [sorted({d.process_index for d in group}) for group in
                                      trainer.mesh.devices.reshape(-1, MESH['tensor'])]}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  sys.path.insert(0, str(CONFIG_FILE.parents[1]))
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
