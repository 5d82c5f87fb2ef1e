"""Entry point: ``python -m vitreg_jax.main --config=configs/X.py:ARG --workdir=DIR --mode=MODE``.

Modes:

* ``train``: ``vitreg_jax.train.loop.run(config, workdir)`` on all devices
  (multi-host: see ``--coordinator_address`` or ``config.distributed``).
* ``plan``: compile the configured recipe's train step for a pod and print
  per-device memory, FLOPs and whether it fits in HBM. Nothing is allocated;
  runs on any CPU. ``--plan.topology=v5e:16x16`` (any v4/v5e/v5p/v6e slice)
  compiles with the TPU compiler itself (libtpu, the ``[tpu]`` extra); without
  libtpu it falls back, saying so, to XLA:CPU on as many simulated devices,
  which ``--plan.devices=N`` asks for directly. HBM per chip follows the
  generation unless ``--plan.hbm_gib`` says otherwise. Override the mesh /
  strategy as usual, e.g.
  ``--config.mesh.fsdp=-1 --config.mesh.tensor=4 --config.sharding.strategy=fsdp_tp``.
* ``export``: the latest checkpoint's backbone in every format of
  ``config.train.export_formats`` (vitreg, dinov2, timm, hf) under ``WORKDIR/export``.
* ``eval``: kNN top-1 and the high-norm-token fraction of the latest checkpoint
  (``--eval_random_init``: of the same network at random init, the baseline).
"""

import json
import math
import os
import re

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ('train', 'plan', 'export', 'eval')

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/supervised.py:smoke.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs (train, export).')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_bool('eval_random_init', False, 'eval: evaluate a freshly initialised network.')
flags.DEFINE_string('plan.topology', None,
                    'plan: TPU slice to compile for with libtpu, e.g. v5e:16x16, v4:4x4x4.')
flags.DEFINE_integer('plan.slices', 1, 'plan: number of such slices (multi-slice over DCN).')
flags.DEFINE_integer('plan.devices', None, 'plan: number of simulated CPU devices instead.')
flags.DEFINE_float('plan.hbm_gib', None, 'plan: HBM per device in GiB; default: the TPU '
                   "generation's (v4 32, v5e 16, v5p 95, v6e 32), 16 for simulated devices.")
flags.DEFINE_string('plan.json', None, 'plan: also write the result as JSON to this path.')
flags.DEFINE_string('coordinator_address', None, 'Multi-process: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process: index of this process.')
FLAGS = flags.FLAGS


def use_cpu_backend() -> None:
  """Runs jax on the host only; must run before jax touches a backend."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')


def simulate_host_devices(num_devices: int) -> None:
  """Makes jax see ``num_devices`` CPU devices; must run before jax touches a backend."""
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                     os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_force_host_platform_device_count={num_devices}'
  use_cpu_backend()


def plan_devices() -> tuple[str | None, int | None]:
  """(topology, simulated device count) from the flags; falls back to simulation without libtpu.

  Decided before jax starts: simulated devices must be set up first.
  """
  from vitreg_jax.parallel import topology  # pylint: disable=import-outside-toplevel
  name, devices, slices = (FLAGS['plan.topology'].value, FLAGS['plan.devices'].value,
                           FLAGS['plan.slices'].value)
  if bool(name) == (devices is not None):
    raise app.UsageError('--mode=plan needs --plan.topology=v5e:16x16 (the TPU compiler, via '
                         'libtpu) or --plan.devices=N (N simulated CPU devices), not both')
  if devices is not None and devices < 1:
    raise app.UsageError(f'--plan.devices={devices}; it must be >= 1')
  if slices < 1:
    raise app.UsageError(f'--plan.slices={slices}; it must be >= 1')
  if not name:
    return None, devices
  try:
    _, dims = topology.parse(name)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if topology.libtpu_version() is not None:
    return name, None
  chips = math.prod(dims) * slices
  logging.warning(
      'libtpu is not installed, so the TPU compiler cannot plan %s; falling back to XLA:CPU on '
      "%d simulated devices. For the TPU's numbers: pip install -e '.[tpu]'", name, chips)
  return None, chips


def run_plan(config) -> None:
  from vitreg_jax.parallel import topology  # pylint: disable=import-outside-toplevel
  name, devices = plan_devices()
  hbm_gib, wanted = FLAGS['plan.hbm_gib'].value, FLAGS['plan.topology'].value
  if name is None:
    simulate_host_devices(devices)
    if wanted and hbm_gib is None:
      hbm_gib = float(topology.HBM_GIB[topology.parse(wanted)[0]])
  else:
    use_cpu_backend()  # the TPU devices are compile-only; never touch a local accelerator
  from vitreg_jax.train import plan  # pylint: disable=import-outside-toplevel
  result = plan.plan_config(config, devices, hbm_gib, topology=name,
                            num_slices=FLAGS['plan.slices'].value)
  if wanted and name is None:
    result.notes.insert(0, f'stands in for TPU topology {wanted} (libtpu is not installed)')
  print(result.table())
  if FLAGS['plan.json'].value:
    with open(FLAGS['plan.json'].value, 'w', encoding='utf-8') as f:
      f.write(result.to_json())


def initialize_distributed(config) -> None:
  from vitreg_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
  cfg = config.get('distributed', {})
  distributed.initialize(
      mode=cfg.get('mode', 'auto'),
      coordinator_address=FLAGS.coordinator_address or cfg.get('coordinator_address') or None,
      num_processes=FLAGS.num_processes or cfg.get('num_processes') or None,
      process_id=FLAGS.process_id if FLAGS.process_id is not None
      else (cfg.get('process_id') if cfg.get('process_id', -1) >= 0 else None))


def run_train(config, workdir: str) -> None:
  initialize_distributed(config)
  from vitreg_jax.train import loop  # pylint: disable=import-outside-toplevel
  loop.run(config, workdir)


def run_export(config, workdir: str) -> None:
  initialize_distributed(config)
  from vitreg_jax.train import loop  # pylint: disable=import-outside-toplevel
  loop.export(config, workdir)


def run_eval(config, workdir: str) -> None:
  initialize_distributed(config)
  from vitreg_jax.train import loop  # pylint: disable=import-outside-toplevel
  metrics = loop.evaluate_checkpoint(config, workdir, random_init=FLAGS.eval_random_init)
  print(json.dumps(metrics))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/supervised.py:smoke')
  mode = FLAGS.mode
  if mode == 'plan':
    run_plan(config)
    return
  if not FLAGS.workdir and not (mode == 'eval' and FLAGS.eval_random_init):
    raise app.UsageError(f'--mode={mode} needs --workdir')
  logging.info('mode %s, workdir %s', mode, FLAGS.workdir)
  {'train': run_train, 'export': run_export, 'eval': run_eval}[mode](config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
