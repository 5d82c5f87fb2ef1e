"""What asynchronous Orbax checkpoints cost the training loop: step time with and without saves.

The same DINOv2 train steps run twice in one process, on the same state and
batch: once without checkpoints (the reference), once saving the whole train
state every ``--every`` steps through ``vitreg_jax.checkpoint.RunCheckpointer``
(async, as the loop does). Printed: the median step time of each run, the
time of the steps that started a save against the other steps, and the
overhead of the saving run over the reference (total time, the save wait at
the end included). Models:

* ``smoke``: the README's quickstart (``configs/dinov2_reg.py:smoke``), a few MB of state;
* ``vitb``: the ViT-B/14 preset's state (student + EMA teacher + AdamW moments +
  65536-prototype heads, ~1.6 GB) at batch 2, 2 global 224² + 2 local 98² crops.

  python experiments/benchmarks/checkpoint_overhead.py --model smoke --steps 60 --every 10
  python experiments/benchmarks/checkpoint_overhead.py --model vitb --steps 12 --every 4

Run on a quiet machine: the load average before and after is printed, and a
run taken under load is flagged.
"""

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np

import machine

from vitreg_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(model: str):
  path = os.path.join(REPO, 'configs', 'dinov2_reg.py')
  if model == 'smoke':
    config = config_lib.from_file(path, 'smoke')
  else:
    config = config_lib.from_file(path, 'variant=B/14')
    config.model.update(dtype='float32', scan_blocks=False, remat_policy='none')
    config.augment.local_crops_number = 2
    config.data.batch_size = config.group_size = 2
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.sharding.strategy = 'dp'
  return config


def state_bytes(state) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def run_steps(sharded, state, batch, steps: int, checkpointer=None, every: int = 0, config=None):
  """Per-step wall times (each step waits for its metrics, as a logging step does)."""
  import jax  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0)
  times, saved, faults = [], [], []
  for step in range(1, steps + 1):
    start, faults_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, metrics = sharded.train_step(state, batch, key)
    jax.block_until_ready(metrics)
    if checkpointer is not None and step % every == 0:
      checkpointer.save(step, state, None, config, force=True)
      saved.append(step)
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
  start = time.perf_counter()
  if checkpointer is not None:
    checkpointer.wait()
  return state, np.asarray(times), saved, time.perf_counter() - start, np.asarray(faults)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', choices=('smoke', 'vitb'), default='smoke')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--every', type=int, default=10)
  machine.add_arguments(parser)
  args = parser.parse_args()
  quiet = machine.Quiet(args)

  import jax  # pylint: disable=import-outside-toplevel
  from vitreg_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from vitreg_jax import recipes  # pylint: disable=import-outside-toplevel

  config = load_config(args.model)
  sharded = recipes.sharded(config, devices=jax.devices()[:1])
  state = sharded.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  abstract = sharded.abstract_batch(config.data.batch_size)
  local = {k: (rng.standard_normal(v.shape).astype(np.float32) if v.dtype == np.float32
               else rng.random(v.shape) < 0.25) for k, v in abstract.items()}
  batch = sharded.global_batch(local, config.data.batch_size)
  state, *_ = run_steps(sharded, state, batch, 2)  # compile and warm up

  workdir = tempfile.mkdtemp(prefix='ckpt_bench_')
  try:
    state, plain, _, _, plain_faults = run_steps(sharded, state, batch, args.steps)
    ckpt = checkpoint.RunCheckpointer(workdir, save_every=args.every, keep=2)
    state, saving, saved, final_wait, saving_faults = run_steps(sharded, state, batch, args.steps, ckpt,
                                                 args.every, config)
    ckpt.close()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  at_save = saving[np.asarray(saved) - 1]
  others = np.delete(saving, np.asarray(saved) - 1)
  overhead = (saving.sum() + final_wait) / plain.sum() - 1
  print(f'DINOv2 {args.model}: state {state_bytes(state) / 2**20:.1f} MiB, batch '
        f'{config.data.batch_size}, {args.steps} steps, a save every {args.every} steps '
        f'({len(saved)} saves), jax {jax.__version__} on {jax.default_backend()}')
  print(f'step time, no checkpoints (reference): median {np.median(plain) * 1e3:.1f} ms')
  print(f'step time, saving run: median {np.median(others) * 1e3:.1f} ms at other steps, '
        f'{np.median(at_save) * 1e3:.1f} ms at save steps (save call included), '
        f'{final_wait * 1e3:.0f} ms waiting for the last save')
  print(f'overhead of checkpointing: {100 * overhead:+.1f}% of total step time '
        f'(save steps alone: {100 * (np.median(at_save) / np.median(plain) - 1):+.1f}%)')
  print(f'minor page faults per step, median: {np.median(plain_faults):.0f} without checkpoints, '
        f'{np.median(np.delete(saving_faults, np.asarray(saved) - 1)):.0f} at other steps of the '
        'saving run')
  quiet.report()

if __name__ == '__main__':
  main()
