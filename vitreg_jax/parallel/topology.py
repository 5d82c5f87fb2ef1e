"""Compile-only devices of a TPU slice: compiling for a pod on a host without TPUs.

libtpu (``pip install -e '.[tpu]'``) describes any slice by name
(``v5e:16x16``, ``v4:4x4x4``): its devices are compile-only, with the real
chip coordinates, hosts (``process_index``) and slice indices, so a mesh over
them is laid out exactly as on the pod and the TPU compiler itself reports
memory and FLOPs. Nothing runs on them.

libtpu discovers its host from the GCE metadata server at load time; on a
machine that is not a TPU VM that only prints errors, so the plugin is loaded
with single-host defaults for ``TPU_ACCELERATOR_TYPE`` / ``TPU_WORKER_HOSTNAMES``
that are undone right after (they would make ``distributed.detect_cluster``
see a pod). libtpu also refuses to load while another process holds
``/tmp/libtpu_lockfile``, which any jax process that probed for a TPU does
(e.g. a CPU training run without ``JAX_PLATFORMS=cpu``); compiling needs no
chip, so the load allows it (``ALLOW_MULTIPLE_LIBTPU_LOAD``).
"""

import contextlib
import importlib.metadata
import importlib.util
import os
import re
from typing import Any, Iterator

# Generation -> one host's accelerator type (quiets host discovery) and whether
# two TensorCores form one device (megacore, JAX's default on v4 / v5p).
GENERATIONS = {
    'v4': ('v4-8', True),
    'v5e': ('v5litepod-4', False),
    'v5p': ('v5p-8', True),
    'v6e': ('v6e-4', False),
}
# HBM per device (= per chip), and the generation each ``device_kind`` belongs to.
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5': 'v5p', 'TPU v6 lite': 'v6e'}
_NAME = re.compile(r'^(v4|v5e|v5p|v6e):(\d+x\d+(?:x\d+)?)$')
_LOAD_ENV = ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'TPU_SKIP_MDS_QUERY',
             'ALLOW_MULTIPLE_LIBTPU_LOAD')


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None when there is none."""
  if importlib.util.find_spec('libtpu') is None:
    return None
  try:
    return importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown version'


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """``'v5e:16x16'`` -> ``('v5e', (16, 16))``; fails naming the valid forms."""
  match = _NAME.match(name)
  if not match:
    raise ValueError(
        f'TPU topology {name!r} is not GENERATION:AxB[xC] with GENERATION one of '
        f'{sorted(GENERATIONS)}, e.g. v5e:16x16 (256 chips), v6e:8x8, v4:4x4x4, v5p:4x4x8')
  dims = tuple(int(d) for d in match.group(2).split('x'))
  if min(dims) < 1:
    raise ValueError(f'TPU topology {name!r} has an empty dimension')
  return match.group(1), dims


@contextlib.contextmanager
def _compile_only_load(generation: str) -> Iterator[None]:
  """Environment for loading libtpu to compile only: quiet, and beside other jax processes."""
  saved = {k: os.environ.get(k) for k in _LOAD_ENV}
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', GENERATIONS[generation][0])
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def devices(name: str, num_slices: int = 1) -> list[Any]:
  """The compile-only devices of ``num_slices`` TPU slices of topology ``name``."""
  generation, _ = parse(name)
  if libtpu_version() is None:
    raise RuntimeError(
        f'compiling for TPU topology {name!r} needs libtpu: pip install -e ".[tpu]"')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {'chip_config_name': 'megacore'} if GENERATIONS[generation][1] else {}
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  with _compile_only_load(generation):
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu',
                                             **kwargs).devices)


def hbm_gib(device: Any) -> float:
  """HBM of one device, from its ``device_kind``."""
  kind = device.device_kind
  if kind not in KINDS:
    raise ValueError(f'unknown HBM size for device kind {kind!r}; known kinds: {sorted(KINDS)} '
                     '(give --plan.hbm_gib)')
  return float(HBM_GIB[KINDS[kind]])


def compiler_name(device: Any) -> str:
  """Which compiler a plan's numbers come from, e.g. 'TPU v5 lite (libtpu 0.0.42.1)'."""
  if device.platform == 'tpu':
    return f'{device.device_kind} (libtpu {libtpu_version()})'
  return f'XLA:{device.platform.upper()} ({device.device_kind})'
