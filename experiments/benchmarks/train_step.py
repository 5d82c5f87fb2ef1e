"""A recipe's train step on this machine: images/s and MFU.

``--recipe dinov2`` (default): DINOv2 ViT-S/14 reg4, the full recipe step
(student on 2 global 224² + 8 local 98² crops, EMA teacher on the global
crops, DINO + iBOT heads with 65536 prototypes, KoLeo, AdamW, EMA).
``--recipe clip``: the paper's CLIP, ViT-B/16 reg4 image tower + OpenCLIP's
text tower (12 x 512, context 77), softmax loss over the batch, AdamW.
Both at a small batch, float32, on the default device. MFU is XLA's
cost-analysis FLOPs of the compiled step / step time / the measured matmul
peak of this machine (``vitreg_jax.train.mfu.measure_matmul_peak``), all
measured in the same run; the analytic model-FLOP count is printed beside it.

  python experiments/benchmarks/train_step.py [--recipe dinov2|clip --batch 8 --steps 6
      --prototypes 65536]

The median is taken over ``--steps`` steps after a warm-up step: with the
CPU malloc settings (``vitreg_jax.cpu_memory``) the first steps may still
grow the heap (a step with page faults); the per-step times are printed.
"""

import argparse
import os
import time

import numpy as np

import machine

from vitreg_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(recipe: str, batch: int, prototypes: int):
  if recipe == 'clip':
    config = config_lib.from_file(os.path.join(REPO, 'configs', 'clip_reg.py'))
    config.model.update(dtype='float32', scan_blocks=False, remat_policy='none')
  else:
    config = config_lib.from_file(os.path.join(REPO, 'configs', 'dinov2_reg.py'), 'variant=S/14')
    config.model.update(dtype='float32', scan_blocks=False, remat_policy='none',
                        drop_path_rate=0.1)
    config.group_size = batch
    config.dino.head_n_prototypes = config.ibot.head_n_prototypes = prototypes
  config.data.batch_size = batch
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.sharding.strategy = 'dp'
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--recipe', choices=('dinov2', 'clip'), default='dinov2')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--prototypes', type=int, default=65536)
  machine.add_arguments(parser)
  args = parser.parse_args()
  quiet = machine.Quiet(args)

  import jax
  from vitreg_jax import recipes
  from vitreg_jax.train import mfu

  config = load_config(args.recipe, args.batch, args.prototypes)
  sharded = recipes.sharded(config, devices=jax.devices()[:1])
  state = sharded.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  abstract = sharded.abstract_batch(args.batch)
  def fake(v):  # images, token ids (EOT = the largest id, last), masks
    if v.dtype == np.float32:
      return rng.standard_normal(v.shape).astype(np.float32)
    if v.dtype == np.int32:
      tokens = rng.integers(1, 49406, v.shape).astype(np.int32)
      tokens[:, -1] = 49407
      return tokens
    return rng.random(v.shape) < 0.25
  local = {k: fake(v) for k, v in abstract.items()}
  batch = sharded.global_batch(local, args.batch)
  key = jax.random.key(0)

  compiled = sharded.lower(args.batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', 0.0))
  analytic = sharded.recipe.analytic_flops(args.batch)

  state, metrics = sharded.train_step(state, batch, key)  # compile + warm up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = sharded.train_step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_time = float(np.median(times))
  peak = mfu.measure_matmul_peak()
  what = (f'CLIP ViT-B/16 reg4 + text 12x512 (context 77), batch {args.batch}'
          if args.recipe == 'clip' else
          f'DINOv2 ViT-S/14 reg4, batch {args.batch} (2x224 + 8x98 crops), {args.prototypes} '
          'prototypes')
  print(f'{what}, float32, jax {jax.__version__} on {jax.default_backend()}')
  print(f'step time (median of {args.steps}): {step_time:.2f} s  ->  {args.batch / step_time:.2f} img/s'
        f'   (steps: {" ".join(f"{t:.2f}" for t in times)}; the first ones may grow the heap)')
  print(f'FLOPs/step: XLA cost analysis {xla_flops / 1e9:.1f} GFLOP, analytic model FLOPs '
        f'{analytic / 1e9:.1f} GFLOP')
  print(f'measured matmul peak: {peak / 1e9:.1f} GFLOP/s')
  quiet.report()
  print(f'MFU (XLA FLOPs / step time / peak): {100 * xla_flops / step_time / peak:.1f}%   '
        f'(analytic: {100 * analytic / step_time / peak:.1f}%)')


if __name__ == '__main__':
  main()
