"""Two processes on 127.0.0.1 (jax.distributed, gloo) == one process, same global batch.

Three meshes: one block of rows per process (create_mesh's order), two
separate blocks per process (as a TPU torus lays out a batch) and a tensor axis
across the processes; the last two train (fsdp across processes, tensor
across processes) and must give the one-process losses.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import parallel_worker

WORKER = pathlib.Path(parallel_worker.__file__)
REPO = WORKER.parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_workers(tmp_path) -> list[dict]:
  """Two processes x 2 devices in one jax.distributed run, and one process x 4 devices.

  Each runs every scenario of ``parallel_worker.SCENARIOS``.
  """
  address = f'127.0.0.1:{_free_port()}'
  runs = [(2, 0, 2), (2, 1, 2), (1, 0, 4)]  # (num_processes, process_id, local devices)
  procs, outs = [], []
  for i, (num_processes, pid, local_devices) in enumerate(runs):
    env = dict(os.environ)
    env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={local_devices} '
                        f'{parallel_worker.XLA_FLAGS}')
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
    out = tmp_path / f'run_{i}.json'
    outs.append(out)
    procs.append(subprocess.Popen(
        [sys.executable, str(WORKER), f'--coordinator_address={address}',
         f'--num_processes={num_processes}', f'--process_id={pid}', f'--out={out}'],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f'run {runs[i]} failed:\n{log[-4000:]}'
  return [json.loads(out.read_text()) for out in outs]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  *processes, reference = _run_workers(tmp_path_factory.mktemp('workers'))
  assert not reference['initialized'] and reference['process_count'] == 1
  for r in processes:
    assert r['initialized'] and r['process_count'] == 2 and r['device_count'] == 4
  return processes, reference


def _assert_trains_like_one_process(processes, reference, scenario):
  want = reference[scenario]
  assert want['blocks'] == [[0, parallel_worker.GLOBAL_BATCH]] and want['shard'] == [0, 1]
  for r in processes:
    np.testing.assert_allclose(r[scenario]['losses'], want['losses'], rtol=0, atol=1e-6)
    np.testing.assert_allclose(r[scenario]['param_norm'], want['param_norm'], rtol=1e-6)
  # The steps really train: the loss moves.
  assert abs(want['losses'][-1] - want['losses'][0]) > 1e-4


@pytest.mark.slow
def test_create_mesh_gives_each_process_one_block(runs):
  """create_mesh's order: fsdp across the processes, tensor inside each."""
  processes, reference = runs
  assert reference['process_major']['blocks'] == [[0, parallel_worker.GLOBAL_BATCH]]
  for pid, r in enumerate(processes):
    got = r['process_major']
    assert all(len(group) == 1 for group in got['tensor_groups_processes'])
    assert got['blocks'] == [[4 * pid, 4 * pid + 4]] and got['shard'] == [pid, 2]
    assert got['loader'] == r['interleaved']['loader']  # same shard index, same examples


@pytest.mark.slow
def test_process_holding_two_separate_blocks_matches_one_process(runs):
  """A torus-like device order: each process feeds two separate row blocks."""
  processes, reference = runs
  assert processes[0]['interleaved']['blocks'] == [[0, 2], [4, 6]]
  assert processes[1]['interleaved']['blocks'] == [[2, 4], [6, 8]]
  assert [r['interleaved']['shard'] for r in processes] == [[0, 2], [1, 2]]
  # The two data shards read different examples.
  assert processes[0]['interleaved']['loader'] != processes[1]['interleaved']['loader']
  _assert_trains_like_one_process(processes, reference, 'interleaved')


@pytest.mark.slow
def test_tensor_axis_across_processes_reads_one_data_shard(runs):
  """tensor spans the processes: both hold every row, so both read the same data."""
  processes, reference = runs
  for r in processes:
    got = r['tensor_across']
    assert all(group == [0, 1] for group in got['tensor_groups_processes'])
    assert got['blocks'] == [[0, parallel_worker.GLOBAL_BATCH]] and got['shard'] == [0, 1]
  # Same shard, same examples and augmentations as the one-process loader.
  assert {r['tensor_across']['loader'] for r in processes} == {
      reference['tensor_across']['loader']}
  _assert_trains_like_one_process(processes, reference, 'tensor_across')
