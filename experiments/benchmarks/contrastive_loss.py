"""Per-device memory and time of the contrastive losses: plain (global logits) against the ring.

The chunked ring exists to keep one ``B/W x B/W`` block of logits per device
instead of ``B x B/W`` rows of the global logits (``losses/contrastive.py``).
For each global batch and loss kind this compiles loss + gradients of both
implementations on 8 simulated CPU devices (batch over the mesh's data x fsdp
axes), prints XLA's per-device temporary memory and the median wall time of
interleaved rounds, and the chunked / plain ratios. CPU devices share the
host's cores, so the times show the relative cost of the ring (it recomputes
the blocks in the backward pass), not accelerator speed; the load average is
printed first because other work on the machine moves them.

  python experiments/benchmarks/contrastive_loss.py [--batches 4096 16384 32768 --dim 512
      --repeats 3 --kinds softmax sigmoid --data 8 --fsdp 1 --time-up-to 32768]

``--time-up-to B`` only compiles (memory) the larger batches: compiling is
cheap, running 32768 on two CPU cores takes minutes.
"""

import argparse
import os
import time

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402

import machine  # noqa: E402

IMPLS = ('plain', 'chunked')
MIB = 2 ** 20


def build(kind, impl, mesh, batch, dim):
  """Compiled ``value_and_grad`` of the loss w.r.t. all inputs, and its (sharded) arguments."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vitreg_jax.losses.contrastive import contrastive_loss
  from vitreg_jax.parallel.rules import BATCH_MESH_AXES

  def loss(img, txt, log_scale, bias):
    return contrastive_loss(kind, img, txt, log_scale, bias, impl=impl, mesh=mesh)

  by_rows = NamedSharding(mesh, P(BATCH_MESH_AXES))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=by_rows)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  return step.lower(emb, emb, scalar, scalar).compile()


def random_inputs(mesh, batch, dim):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vitreg_jax.parallel.rules import BATCH_MESH_AXES

  @jax.jit
  def make(key):
    img, txt = jax.random.normal(key, (2, batch, dim))
    unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return unit(img), unit(0.6 * img + 0.4 * txt)

  by_rows = NamedSharding(mesh, P(BATCH_MESH_AXES))
  img, txt = jax.jit(make, out_shardings=(by_rows, by_rows))(jax.random.key(0))
  return img, txt, jnp.float32(np.log(10.0)), jnp.float32(-10.0)


def median_seconds(compiled_by_impl, args, repeats):
  import jax
  for compiled in compiled_by_impl.values():
    jax.block_until_ready(compiled(*args))  # warm up
  times = {impl: [] for impl in compiled_by_impl}
  for _ in range(repeats):
    for impl, compiled in compiled_by_impl.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[impl].append(time.perf_counter() - t0)
  return {impl: float(np.median(t)) for impl, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batches', type=int, nargs='+', default=[4096, 16384, 32768])
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--kinds', nargs='+', default=['softmax', 'sigmoid'])
  parser.add_argument('--data', type=int, default=8)
  parser.add_argument('--fsdp', type=int, default=1)
  parser.add_argument('--time-up-to', type=int, default=None,
                      help='time only global batches up to this size (default: all)')
  machine.add_arguments(parser)
  args = parser.parse_args()
  quiet = machine.Quiet(args)

  import jax
  from vitreg_jax.parallel.mesh import create_mesh

  mesh = create_mesh({'data': args.data, 'fsdp': args.fsdp, 'tensor': 1})
  ring = args.data * args.fsdp
  print(f'jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} devices, '
        f'batch over data={args.data} x fsdp={args.fsdp}, embed {args.dim}, float32, '
        f'loss + grads w.r.t. img, txt, log_scale, bias; median of {args.repeats}')
  print(f'{"kind":8s} {"batch":>6s} {"plain MiB":>10s} {"chunked MiB":>12s} {"mem ratio":>9s} '
        f'{"plain s":>8s} {"chunked s":>9s} {"time ratio":>10s}')
  for batch in args.batches:
    timed = args.time_up_to is None or batch <= args.time_up_to
    inputs = random_inputs(mesh, batch, args.dim) if timed else None
    for kind in args.kinds:
      compiled = {impl: build(kind, impl, mesh, batch, args.dim) for impl in IMPLS}
      temp = {impl: c.memory_analysis().temp_size_in_bytes for impl, c in compiled.items()}
      row = (f'{kind:8s} {batch:6d} {temp["plain"] / MIB:10.1f} {temp["chunked"] / MIB:12.1f} '
             f'{temp["chunked"] / temp["plain"]:9.3f}')
      if timed:
        seconds = median_seconds(compiled, inputs, args.repeats)
        row += (f' {seconds["plain"]:8.3f} {seconds["chunked"]:9.3f} '
                f'{seconds["chunked"] / seconds["plain"]:10.2f}')
      else:
        row += f' {"-":>8s} {"-":>9s} {"-":>10s}'
      print(row, flush=True)
  local = max(args.batches) // ring
  print(f'(one {local} x {local} float32 block of logits = {4 * local * local / MIB:.1f} MiB; '
        f'global rows per device {max(args.batches)} x {local} = '
        f'{4 * max(args.batches) * local / MIB:.1f} MiB)')
  quiet.report()


if __name__ == '__main__':
  main()
