"""Keep XLA:CPU's per-step temporaries mapped between steps (glibc malloc settings).

XLA:CPU allocates an executable's temporaries afresh at every call (4.85 GB
for a ViT-S/14 forward+backward at batch 32). glibc serves blocks above 32 MB
with ``mmap`` and returns them with ``munmap``, so every step faults all of
its memory in again: 1.3 M minor page faults and ~3.5 s of kernel time of a
6.6 s step. Served from one heap that is never trimmed, the same step takes
4.4 s with no faults (``experiments/benchmarks/forward.py`` measures both).

The price is the heap's high-water mark: the process keeps its peak, and
fragmentation can double it once (ViT-S fwd+bwd: peak RSS 5.6 -> 10.2 GB).
The settings apply to the whole process and to arenas created afterwards,
so they must be made before JAX starts its backend threads; on a host whose
JAX has an accelerator plugin (TPU/GPU) nothing is changed.
"""

import ctypes
import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def accelerator_possible() -> bool:
  """Whether JAX could pick a TPU or GPU: libtpu on a host with TPU chips, or any plugin.

  libtpu alone (the ``[tpu]`` extra, for ``--mode=plan``) on a host without
  chips falls back to the CPU, as JAX does; other plugins count as present.
  """
  if importlib.util.find_spec('libtpu') is not None and (
      glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def backend_will_be_cpu() -> bool:
  """JAX will run on the host: ``JAX_PLATFORMS`` starts with cpu, or no accelerator is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not accelerator_possible()


def keep_buffers_mapped() -> bool:
  """One never-trimmed malloc heap for the process when JAX runs on the CPU; True if applied.

  Call before JAX initialises its backend (``jax.devices()``, the first jit):
  threads that have already allocated keep their arenas. Not glibc (macOS,
  musl): nothing to do.
  """
  if not backend_will_be_cpu():
    return False
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  # one arena (threads' own arenas would munmap their heaps), no mmap'd blocks, never trim
  # (-1: glibc reads it as SIZE_MAX)
  return all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
