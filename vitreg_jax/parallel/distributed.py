"""Multi-process start-up: ``jax.distributed.initialize`` when there are several hosts.

Must run before anything touches the devices. Three ways to ask for it, first
match wins:

1. explicit values (command-line flags or ``config.distributed``):
   ``coordinator_address``, ``num_processes``, ``process_id``;
2. environment: ``JAX_COORDINATOR_ADDRESS`` (read by jax itself),
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: the usual way on CPU/GPU clusters;
3. auto-detection (``mode='auto'``): on Cloud TPU VMs (single- or multi-host
   pods), under SLURM or Open MPI with more than one task, jax discovers the
   coordinator and ranks itself.

Otherwise the run is single-process and nothing is initialised.
"""

import glob
import logging
import os

import jax

MODES = ('auto', 'on', 'off')


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'environment variable {name}={value!r} is not an integer') from None


def detect_cluster() -> str | None:
  """Names the multi-process environment jax can auto-configure, if any."""
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') or os.environ.get(
      'TPU_WORKER_HOSTNAMES') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'cloud_tpu'
  if (_int_env('SLURM_NTASKS') or 1) > 1:
    return 'slurm'
  if (_int_env('OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return 'openmpi'
  return None


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Initialises the distributed runtime when needed; returns whether it did.

  ``mode='off'`` never initialises; ``'on'`` always does (auto-detecting what
  is not given); ``'auto'`` does when values are given or a cluster is found.
  """
  if mode not in MODES:
    raise ValueError(f'distributed mode {mode!r}; valid: {MODES}')
  if mode == 'off' or jax.distributed.is_initialized():
    return False
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None or num_processes <= 0:
    num_processes = _int_env('JAX_NUM_PROCESSES')
  if process_id is None or process_id < 0:
    process_id = _int_env('JAX_PROCESS_ID')
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    missing = [n for n, v in zip(('coordinator_address', 'num_processes', 'process_id'), explicit)
               if v is None]
    if missing and detect_cluster() is None:
      raise ValueError(
          f'multi-process run needs coordinator_address, num_processes and process_id; '
          f'missing {missing} (flags, config.distributed or JAX_COORDINATOR_ADDRESS / '
          'JAX_NUM_PROCESSES / JAX_PROCESS_ID)')
    if num_processes == 1 and mode == 'auto':
      return False
  elif mode == 'auto':
    cluster = detect_cluster()
    if cluster is None:
      return False
    logging.info('detected %s: initialising jax.distributed', cluster)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
