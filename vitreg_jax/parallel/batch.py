"""Per-process batches -> global ``jax.Array``s sharded on the batch axes.

Each process loads only the rows its own devices hold. Which rows those are
follows from the mesh and the ``batch`` rule (data x fsdp): ``BatchLayout``
works them out from the sharding itself, so the data pipeline never guesses.
When an axis that does not shard the batch (``tensor``) spans processes,
several processes hold the same rows and must load the same examples;
``shard_index`` / ``num_shards`` tell the loader which copy of the data to read.
"""

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vitreg_jax.parallel import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """Which rows of the global batch this process feeds."""
  global_batch_size: int
  batch_shards: int  # devices the batch is split over (product of its mesh axes)
  process_start: int
  process_stop: int

  @property
  def per_process_batch_size(self) -> int:
    return self.process_stop - self.process_start

  @property
  def num_shards(self) -> int:
    """Distinct per-process slices of the global batch (data-loader shard count)."""
    return self.global_batch_size // self.per_process_batch_size

  @property
  def shard_index(self) -> int:
    return self.process_start // self.per_process_batch_size


def batch_mesh_axes(rules: rules_lib.Rules, mesh: Mesh) -> tuple[str, ...]:
  spec = rules_lib.partition_spec(('batch',), (math.prod(mesh.shape.values()),), rules, mesh)
  axes = spec[0]
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_layout(mesh: Mesh, rules: rules_lib.Rules, global_batch_size: int) -> BatchLayout:
  """Validates ``global_batch_size`` against the mesh; finds this process's rows."""
  axes = batch_mesh_axes(rules, mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size <= 0 or global_batch_size % shards:
    sizes = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes) or 'none'
    lower = global_batch_size // shards * shards
    raise ValueError(
        f'global batch size {global_batch_size} does not divide over the {shards} batch '
        f'shards of the mesh ({sizes}); use a multiple of {shards}, e.g. '
        f'{max(lower, shards)} or {lower + shards}')
  sharding = NamedSharding(mesh, PartitionSpec(axes or None))
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                 for idx in index_map.values()})
  start, stop = rows[0][0], rows[0][1]
  for lo, hi in rows[1:]:
    if lo != stop:
      raise ValueError(
          f'process {jax.process_index()} holds non-contiguous batch rows {rows}; the mesh '
          'device order must give each process one block of the batch')
    stop = hi
  return BatchLayout(global_batch_size, shards, start, stop)


def batch_shardings(batch_axes: Mapping[str, Sequence[str | None]], batch: Mapping[str, Any],
                    mesh: Mesh, rules: rules_lib.Rules) -> dict[str, NamedSharding]:
  """``NamedSharding`` per batch field from its logical axes (e.g. ``('batch', None)``)."""
  missing = sorted(set(batch) - set(batch_axes))
  if missing:
    raise ValueError(f'batch fields {missing} have no logical axes; known: {sorted(batch_axes)}')
  return {k: rules_lib.logical_sharding(batch_axes[k], tuple(v.shape), rules, mesh)
          for k, v in batch.items()}


def global_batch(local_batch: Mapping[str, np.ndarray], layout: BatchLayout,
                 shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays (no cross-host copies)."""
  out = {}
  for key, local in local_batch.items():
    local = np.asarray(local)
    if local.ndim == 0 or local.shape[0] != layout.per_process_batch_size:
      raise ValueError(
          f'batch field {key!r} has shape {local.shape} in process {jax.process_index()}; '
          f'expected {layout.per_process_batch_size} rows (global batch '
          f'{layout.global_batch_size} over {layout.num_shards} process shards)')
    global_shape = (layout.global_batch_size,) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(shardings[key], local, global_shape)
  return out
