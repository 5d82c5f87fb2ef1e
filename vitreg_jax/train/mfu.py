"""Model FLOPs utilisation: model FLOPs per second over the hardware's peak.

On accelerators the peak comes from the config (``train.peak_flops_per_device``,
e.g. 197e12 for a TPU v5e in bf16). A CPU has no datasheet number that means
anything here, so with a peak of 0 the peak is *measured*: the best float32
matmul throughput XLA reaches on this machine.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted ``size x size`` float32 matmul on the default device."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def peak_flops(peak_per_device: float, num_devices: int) -> float:
  """Total peak FLOP/s of the run; on CPU the simulated devices share one machine."""
  if peak_per_device:
    return peak_per_device * num_devices
  return measure_matmul_peak()


def mfu(flops_per_step: float, seconds_per_step: float, total_peak: float) -> float:
  return flops_per_step / seconds_per_step / total_peak
