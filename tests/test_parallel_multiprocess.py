"""Two processes on 127.0.0.1 (jax.distributed, gloo) == one process, same global batch."""

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
  """Two processes x 2 devices in one jax.distributed run, and one process x 4 devices."""
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


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  *processes, reference = _run_workers(tmp_path)

  assert not reference['initialized'] and reference['process_count'] == 1
  assert reference['rows'] == [0, parallel_worker.GLOBAL_BATCH]
  for pid, r in enumerate(processes):
    assert r['initialized'] and r['process_count'] == 2 and r['device_count'] == 4
    # fsdp crosses the two processes, tensor stays inside each one.
    assert all(len(group) == 1 for group in r['tensor_groups_processes'])
    assert r['rows'] == [4 * pid, 4 * pid + 4]
    np.testing.assert_allclose(r['losses'], reference['losses'], rtol=0, atol=1e-6)
    np.testing.assert_allclose(r['param_norm'], reference['param_norm'], rtol=1e-6)
  # The steps really train: the loss moves.
  assert abs(reference['losses'][-1] - reference['losses'][0]) > 1e-4
