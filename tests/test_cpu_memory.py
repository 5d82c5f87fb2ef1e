"""The CPU malloc settings: a jitted step stops faulting its temporaries in again.

Each case runs in a fresh process, as the settings must precede JAX's backend
threads (and would leak into this test session otherwise).
"""

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from vitreg_jax import cpu_memory

STEPS = 40
STEP = textwrap.dedent(f'''
    import resource, sys
    from vitreg_jax import cpu_memory
    applied = cpu_memory.keep_buffers_mapped() if sys.argv[1] == 'keep' else False
    import jax, jax.numpy as jnp
    x = jnp.ones((2048, 2048), jnp.float32)  # 16 MB temporaries, mmap'd by default
    step = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x) + jnp.exp(x) @ x).sum())
    faults = []
    for _ in range({STEPS}):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(step(x))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *faults[1:])  # the first step also maps in the program and its inputs
''')


def page_faults_per_step(mode: str):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', STEP, mode], env=env, capture_output=True,
                       text=True, check=True, timeout=600).stdout.split()
  return out[0] == 'True', [int(f) for f in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith('linux') or ctypes.util.find_library('c') is None,
                    reason='mallopt is glibc (Linux) only')
def test_kept_buffers_stop_page_faults_between_steps():
  """By default every step faults its two 16 MB temporaries in (8192 pages); kept, a step
  faults only while the heap grows to cover the allocation order's worst case (measured:
  1-9 of 39 steps, 0.4-21% of the default's faults)."""
  applied, kept = page_faults_per_step('keep')
  _, default = page_faults_per_step('default')
  assert applied
  faulting = lambda faults: sum(f > 100 for f in faults)
  assert faulting(default) >= 0.9 * len(default), default
  assert faulting(kept) <= len(kept) / 3, kept
  assert sum(kept) <= sum(default) / 3, (sum(kept), sum(default))


@pytest.mark.parametrize('platforms,cpu', [('cpu', True), ('cpu,tpu', True), ('tpu', False),
                                           ('cuda,cpu', False)])
def test_applies_only_when_jax_runs_on_the_cpu(monkeypatch, platforms, cpu):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert cpu_memory.backend_will_be_cpu() == cpu
