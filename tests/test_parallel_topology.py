"""Meshes and batch layouts on real TPU slices, from libtpu's compile-only devices.

Nothing runs on these devices: they carry the chips' coordinates and hosts,
so the tests see the mesh order and the per-host batch rows a v5e-256 launch
would (hosts holding several separate blocks of the batch, replicas across a
``tensor`` axis).
"""

import math

import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from vitreg_jax.parallel import batch as batch_lib
from vitreg_jax.parallel import mesh as mesh_lib
from vitreg_jax.parallel import rules as rules_lib
from vitreg_jax.parallel import topology

pytestmark = pytest.mark.skipif(topology.libtpu_version() is None,
                                reason="needs libtpu: pip install -e '.[tpu]'")


def layouts(name, mesh_config, strategy, batch):
  """The mesh over topology ``name`` and every host's layout of a global ``batch``."""
  mesh = mesh_lib.create_mesh(mesh_config, topology.devices(name))
  hosts = sorted({d.process_index for d in mesh.devices.flat})
  rules = rules_lib.get_rules(strategy)
  return mesh, {p: batch_lib.batch_layout(mesh, rules, batch, process_index=p) for p in hosts}


def assert_rows_partitioned(by_host, batch):
  """Blocks sorted and disjoint; distinct row sets (one per data shard) cover each row once."""
  for layout in by_host.values():
    starts = [b for block in layout.blocks for b in block]
    assert starts == sorted(starts) and all(lo < hi for lo, hi in layout.blocks)
    assert len(layout.rows()) == layout.per_process_batch_size
  shards = {}
  for layout in by_host.values():
    assert shards.setdefault(layout.shard_index, layout.blocks) == layout.blocks
  rows = np.sort(np.concatenate([np.concatenate([np.arange(*b) for b in blocks])
                                 for blocks in shards.values()]))
  np.testing.assert_array_equal(rows, np.arange(batch))
  num_shards = {layout.num_shards for layout in by_host.values()}
  assert num_shards == {len(shards)} and sorted(shards) == list(range(len(shards)))


@pytest.mark.parametrize('name, chips, hosts, kind, hbm', [
    ('v5e:2x2', 4, 1, 'TPU v5 lite', 16),
    ('v5e:4x4', 16, 4, 'TPU v5 lite', 16),
    ('v6e:4x4', 16, 4, 'TPU v6 lite', 32),
    ('v4:2x2x2', 8, 2, 'TPU v4', 32),     # megacore: one device per chip, as JAX runs v4
    ('v5p:2x2x2', 8, 2, 'TPU v5', 95),
])
def test_topology_devices_per_generation(name, chips, hosts, kind, hbm):
  devices = topology.devices(name)
  assert len(devices) == chips and len({d.process_index for d in devices}) == hosts
  assert {d.platform for d in devices} == {'tpu'} and {d.device_kind for d in devices} == {kind}
  assert all(len(d.coords) == 3 for d in devices)
  assert topology.hbm_gib(devices[0]) == hbm


@pytest.mark.parametrize('name', ['v5e-256', 'v5litepod-16', 'v3:4x4', 'v5e:16', 'v5e:0x4'])
def test_bad_topology_names_fail_naming_the_valid_forms(name):
  with pytest.raises(ValueError, match=r"GENERATION:AxB\[xC\]|empty dimension"):
    topology.parse(name)


def test_create_mesh_lays_a_v5e_256_slice_on_the_torus():
  devices = topology.devices('v5e:16x16')
  mesh = mesh_lib.create_mesh({'data': 1, 'fsdp': -1, 'tensor': 4}, devices)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 64, 'tensor': 4}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  # Each tensor group is a line of 4 neighbouring chips (one ICI hop apart).
  for group in mesh.devices.reshape(-1, 4):
    coords = np.array([d.coords for d in group])
    assert sum(np.abs(np.diff(coords, axis=0)).sum(axis=1) == 1) == 3


def test_two_slices_split_the_data_axis_over_dcn():
  devices = topology.devices('v5e:4x4', num_slices=2)
  mesh = mesh_lib.create_mesh({'data': 2, 'fsdp': -1, 'tensor': 2}, devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 8, 'tensor': 2}
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}


def test_v5e_256_hosts_feed_two_separate_blocks():
  """The v5e:16x16 DINOv2 launch that stopped: host 0 holds rows 0-31 and 256-287."""
  batch = 4096  # 16 per chip
  _, by_host = layouts('v5e:16x16', {'data': 1, 'fsdp': -1, 'tensor': 1}, 'fsdp', batch)
  assert len(by_host) == 64
  assert by_host[0].blocks == ((0, 32), (256, 288))
  assert {layout.per_process_batch_size for layout in by_host.values()} == {64}
  assert {len(layout.blocks) for layout in by_host.values()} == {2}
  assert {layout.num_shards for layout in by_host.values()} == {64}
  assert_rows_partitioned(by_host, batch)


def test_v5e_4x4_four_hosts_cover_the_batch_once():
  _, by_host = layouts('v5e:4x4', {'data': 1, 'fsdp': -1, 'tensor': 1}, 'fsdp', 64)
  assert len(by_host) == 4 and {layout.num_shards for layout in by_host.values()} == {4}
  assert any(len(layout.blocks) > 1 for layout in by_host.values())
  assert_rows_partitioned(by_host, 64)


@pytest.mark.parametrize('name, mesh_config, batch, shards', [
    ('v5e:16x16', {'data': 1, 'fsdp': -1, 'tensor': 4}, 1024, 32),
    ('v5e:4x4', {'data': 1, 'fsdp': -1, 'tensor': 4}, 64, 2),
    ('v4:4x4x4', {'data': 1, 'fsdp': -1, 'tensor': 4}, 64, 8),
])
def test_hosts_sharing_rows_across_tensor_read_the_same_shard(name, mesh_config, batch, shards):
  mesh, by_host = layouts(name, mesh_config, 'fsdp_tp', batch)
  groups = mesh.devices.reshape(-1, mesh.shape['tensor'])
  assert any(len({d.process_index for d in g}) > 1 for g in groups)  # tensor spans hosts
  assert {layout.num_shards for layout in by_host.values()} == {shards}
  hosts_per_shard = len(by_host) // shards
  for index in range(shards):
    holders = [p for p, layout in by_host.items() if layout.shard_index == index]
    assert len(holders) == hosts_per_shard
    assert len({by_host[p].blocks for p in holders}) == 1  # same rows, same shard
  assert_rows_partitioned(by_host, batch)
  assert {layout.per_process_batch_size for layout in by_host.values()} == {batch // shards}


def test_row_sets_that_overlap_without_being_equal_fail():
  """A hand-made order where host 0 and host 1 share one block but not the other."""
  devices = topology.devices('v5e:2x4')  # 2 hosts x 4 chips
  host = {p: [d for d in devices if d.process_index == p] for p in (0, 1)}
  order = [host[0][0], host[1][0], host[0][1], host[0][2], host[1][1], host[1][2],
           host[0][3], host[1][3]]  # fsdp=4 x tensor=2: block 0 on both hosts
  mesh = Mesh(np.array(order, dtype=object).reshape(1, 4, 2), mesh_lib.MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(ValueError, match='overlap without being equal'):
    batch_lib.batch_layout(mesh, rules_lib.get_rules('fsdp_tp'), 8, process_index=0)


def test_batch_shards_and_sizes_follow_the_rules():
  mesh, by_host = layouts('v5e:4x4', {'data': 2, 'fsdp': -1, 'tensor': 1}, 'dp', 32)
  assert {layout.batch_shards for layout in by_host.values()} == {math.prod(mesh.shape.values())}
  with pytest.raises(ValueError, match='global batch size 24 does not divide over the 16'):
    batch_lib.batch_layout(mesh, rules_lib.get_rules('dp'), 24, process_index=0)
