"""Per-process batches -> global ``jax.Array``s sharded on the batch axes.

Each process loads only the rows its own devices hold. Which rows those are
follows from the mesh and the ``batch`` rule (data x fsdp): ``BatchLayout``
works them out from the sharding itself, so the data pipeline never guesses.

On a TPU slice the mesh follows the torus (``mesh_utils``), not the hosts, so
a host's chips can hold several separate blocks of the batch (on v5e:16x16
with fsdp=256, host 0 holds rows 0-31 and 256-287). A process then loads
the concatenation of its blocks, in global-row order, and ``global_batch``
places each block on its devices.

When an axis that does not shard the batch (``tensor``) spans processes,
several processes hold the same rows and must load the same examples:
``shard_index`` / ``num_shards`` say which copy of the data a process reads
(processes holding the same rows share an index), so the data loader takes
them from here rather than from ``jax.process_index()``.
"""

import collections
import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vitreg_jax.parallel import rules as rules_lib

Blocks = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """Which rows of the global batch one process feeds, and which data shard it reads."""
  global_batch_size: int
  batch_shards: int  # devices the batch is split over (product of its mesh axes)
  blocks: Blocks     # this process's rows: sorted, disjoint [start, stop) blocks
  shard_index: int   # which distinct row set (data-loader shard) this process holds
  num_shards: int    # distinct row sets over all processes

  @property
  def per_process_batch_size(self) -> int:
    return sum(stop - start for start, stop in self.blocks)

  def rows(self) -> np.ndarray:
    """Global row index of each row of this process's batch (its blocks, concatenated)."""
    return np.concatenate([np.arange(start, stop) for start, stop in self.blocks])

  def local_rows(self, global_array: np.ndarray) -> np.ndarray:
    """This process's rows of a whole global batch (tests, single-host tools)."""
    return np.concatenate([global_array[start:stop] for start, stop in self.blocks])


def _leading_axes(spec: PartitionSpec) -> tuple[str, ...]:
  axes = spec[0] if len(spec) else None
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_mesh_axes(rules: rules_lib.Rules, mesh: Mesh) -> tuple[str, ...]:
  return _leading_axes(rules_lib.partition_spec(
      ('batch',), (math.prod(mesh.shape.values()),), rules, mesh))


def _merge(blocks) -> Blocks:
  """Sorted blocks with touching neighbours joined: (0, 16), (16, 32) -> (0, 32)."""
  merged: list[tuple[int, int]] = []
  for start, stop in sorted(blocks):
    if merged and merged[-1][1] == start:
      merged[-1] = (merged[-1][0], stop)
    else:
      merged.append((start, stop))
  return tuple(merged)


def process_blocks(sharding: NamedSharding, global_batch_size: int,
                   process_of=None) -> dict[int, Blocks]:
  """Row blocks of every process under ``sharding`` (leading axis = batch).

  ``process_of(device)`` (default: ``device.process_index``) lets one host
  lay out a batch for another process grouping of the same devices.
  """
  process_of = process_of or (lambda device: device.process_index)
  rows = collections.defaultdict(set)
  for device, index in sharding.devices_indices_map((global_batch_size,)).items():
    rows[process_of(device)].add((index[0].start or 0, index[0].stop or global_batch_size))
  return {process: _merge(blocks) for process, blocks in sorted(rows.items())}


def layout_from_sharding(sharding: NamedSharding, global_batch_size: int,
                         process_index: int | None = None, process_of=None) -> BatchLayout:
  """The layout of ``process_index`` (default: this process) under a batch sharding.

  Distinct row sets must partition the batch into equal parts (each row read
  by one data shard, every shard the same size): true of every mesh built from
  ``MESH_AXES``; a hand-made device order that breaks it fails here.
  """
  process_index = jax.process_index() if process_index is None else process_index
  blocks = process_blocks(sharding, global_batch_size, process_of)
  if process_index not in blocks:
    raise ValueError(f'process {process_index} holds no device of the mesh; processes with '
                     f'devices: {sorted(blocks)}')
  distinct = sorted(set(blocks.values()))  # ordered by first row
  covered = sorted(row for row_set in distinct for block in row_set for row in range(*block))
  if covered != list(range(global_batch_size)):
    overlapping = {p: b for p, b in blocks.items() if b != blocks[process_index]
                   and set(b) & set(blocks[process_index])}
    raise ValueError(
        f'the batch rows held by processes overlap without being equal (process '
        f'{process_index}: {blocks[process_index]}, others: {overlapping}); every process '
        'must hold either the same rows as another or none of them')
  sizes = {sum(hi - lo for lo, hi in row_set) for row_set in distinct}
  if len(sizes) > 1:
    raise ValueError(f'processes hold unequal numbers of batch rows {sorted(sizes)}: '
                     f'{blocks}; the data loaders need equal shards')
  shards = math.prod(sharding.mesh.shape[a] for a in _leading_axes(sharding.spec))
  return BatchLayout(global_batch_size, shards, blocks[process_index],
                     distinct.index(blocks[process_index]), len(distinct))


def batch_layout(mesh: Mesh, rules: rules_lib.Rules, global_batch_size: int,
                 process_index: int | None = None, process_of=None) -> BatchLayout:
  """Validates ``global_batch_size`` against the mesh; finds a process's rows.

  ``process_index`` defaults to this process; other values (and ``process_of``,
  see ``process_blocks``) let a single host inspect a pod's layout (e.g. on the
  compile-only devices of a TPU topology).
  """
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
  return layout_from_sharding(sharding, global_batch_size, process_index, process_of)


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
  """Assembles each process's rows into global arrays (no cross-host copies).

  ``local_batch`` holds the process's blocks concatenated in global-row order
  (``layout.rows()``); ``jax.make_array_from_process_local_data`` maps its
  i-th block of device rows onto the i-th distinct row offset this process's
  devices hold, which is exactly that order, contiguous or not.
  """
  out = {}
  for key, local in local_batch.items():
    local = np.asarray(local)
    if local.ndim == 0 or local.shape[0] != layout.per_process_batch_size:
      raise ValueError(
          f'batch field {key!r} has shape {local.shape} in process {jax.process_index()}; '
          f'expected {layout.per_process_batch_size} rows, its blocks {list(layout.blocks)} '
          f'of the global batch {layout.global_batch_size} (data shard {layout.shard_index} '
          f'of {layout.num_shards})')
    global_shape = (layout.global_batch_size,) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(shardings[key], local, global_shape)
  return out
