"""The device mesh, built from ``config.mesh`` (axes ``data``, ``fsdp``, ``tensor``).

Axis order is outermost to innermost: ``tensor`` is innermost, so its devices
are neighbours (same host on CPU/GPU, nearest ICI links on TPU) — tensor
parallelism all-reduces activations every layer and is the most
bandwidth-hungry axis. On multi-slice TPU only the outer ``data`` (or else
``fsdp``) axis crosses the slow data-centre network.

Axes are ``AxisType.Auto``: jax 0.10 defaults to ``Explicit``, under which
flax.linen's sharding constraints are rejected.

The same code builds the mesh over a real slice and over the compile-only
devices of a named topology (``parallel/topology.py``): ``mesh_utils`` lays
the axes onto the torus from the chip coordinates, so a host may hold several
separate blocks of the batch (``parallel/batch.py`` handles that).
"""

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ('data', 'fsdp', 'tensor')


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for ``MESH_AXES``; one axis may be -1 (= all remaining devices).

  Missing axes default to 1. Fails naming the numbers when the sizes cannot
  cover ``num_devices`` exactly.
  """
  config = dict(mesh_config)
  unknown = sorted(set(config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {unknown}; valid axes: {list(MESH_AXES)}')
  sizes = {axis: int(config.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  bad = {axis: size for axis, size in sizes.items() if size == 0 or size < -1}
  if bad:
    raise ValueError(f'config.mesh sizes must be positive or -1, got {bad}')
  if len(fill) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got -1 for {fill}')
  described = ' x '.join(f'{a}={s}' for a, s in sizes.items())
  if fill:
    known = math.prod(s for s in sizes.values() if s != -1)
    if num_devices % known:
      raise ValueError(
          f'config.mesh ({described}): {num_devices} devices are not divisible by the '
          f'fixed axes\' product {known}, so {fill[0]}=-1 cannot be filled')
    sizes[fill[0]] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(
        f'config.mesh ({described}) needs {total} devices but {num_devices} are available; '
        f'make the product equal {num_devices} or set one axis to -1')
  return tuple(sizes[axis] for axis in MESH_AXES)


def _num_slices(devices: Sequence[Any]) -> int:
  # Compile-only devices of a single-slice topology have slice_index None.
  return len({getattr(d, 'slice_index', None) or 0 for d in devices})


def _torus_grid(make, *args) -> np.ndarray:
  """``mesh_utils`` layout; splits physical axes only when the logical ones do not fit."""
  try:
    return make(*args)
  except (ValueError, NotImplementedError, AssertionError):
    return make(*args, allow_split_physical_axes=True)


def _multislice_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """Puts the slice (DCN) split on ``data``, else ``fsdp``; never on ``tensor``."""
  slices = _num_slices(devices)
  for axis in (0, 1):
    if shape[axis] % slices == 0:
      dcn = [1, 1, 1]
      dcn[axis] = slices
      ici = [s // d for s, d in zip(shape, dcn)]
      return _torus_grid(mesh_utils.create_hybrid_device_mesh, ici, dcn, devices)
  raise ValueError(
      f'{slices} TPU slices: mesh data={shape[0]} or fsdp={shape[1]} must be a multiple of '
      'the slice count so that only that axis crosses the data-centre network')


def device_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """Arranges ``devices`` into ``shape`` keeping the inner axes local."""
  if _num_slices(devices) > 1:
    return _multislice_grid(shape, devices)
  if devices[0].platform == 'tpu':
    return _torus_grid(mesh_utils.create_device_mesh, shape, devices)
  # CPU / GPU: hosts are processes; process-major order keeps inner axes on one host.
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.array(ordered, dtype=object).reshape(shape)


def _warn_if_tensor_crosses_hosts(mesh: Mesh) -> None:
  groups = mesh.devices.reshape(-1, mesh.shape['tensor'])
  crossing = sum(len({d.process_index for d in group}) > 1 for group in groups)
  if crossing and mesh.devices.flat[0].platform != 'tpu':
    logging.warning(
        'mesh tensor=%d spans several processes in %d of %d groups (%d local devices per '
        'process); tensor parallelism across hosts is slow, consider tensor <= %d',
        mesh.shape['tensor'], crossing, len(groups), jax.local_device_count(),
        jax.local_device_count())


def create_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """``Mesh`` over ``devices`` (default: all) with axes ``MESH_AXES``, all Auto."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  mesh = Mesh(device_grid(shape, devices), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))
  _warn_if_tensor_crosses_hosts(mesh)
  return mesh
