"""Entry point: ``python -m vitreg_jax.main --config=configs/X.py:ARG --workdir=DIR --mode=MODE``.

Modes:

* ``train``: ``vitreg_jax.train.loop.run(config, workdir)`` on all devices
  (multi-host: see ``--coordinator_address`` or ``config.distributed``).
* ``plan``: compile the configured recipe's train step for
  ``--plan.devices`` simulated devices and print per-device memory, FLOPs and
  whether it fits ``--plan.hbm_gib``. Nothing is allocated; runs on any CPU.
  Override the mesh / strategy as usual, e.g.
  ``--config.mesh.fsdp=-1 --config.mesh.tensor=4 --config.sharding.strategy=fsdp_tp``.
* ``export``: the latest checkpoint's backbone in every format of
  ``config.train.export_formats`` (vitreg, dinov2, timm, hf) under ``WORKDIR/export``.
* ``eval``: kNN top-1 and the high-norm-token fraction of the latest checkpoint
  (``--eval_random_init``: of the same network at random init, the baseline).
"""

import json
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
flags.DEFINE_integer('plan.devices', None, 'plan: number of (simulated) devices.')
flags.DEFINE_float('plan.hbm_gib', 16.0, 'plan: HBM per device in GiB (v4: 32, v5e: 16, v5p: 95).')
flags.DEFINE_string('plan.json', None, 'plan: also write the result as JSON to this path.')
flags.DEFINE_string('coordinator_address', None, 'Multi-process: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process: index of this process.')
FLAGS = flags.FLAGS


def simulate_host_devices(num_devices: int) -> None:
  """Makes jax see ``num_devices`` CPU devices; must run before jax touches a backend."""
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                     os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_force_host_platform_device_count={num_devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')


def run_plan(config) -> None:
  devices = FLAGS['plan.devices'].value
  if not devices or devices < 1:
    raise app.UsageError('--mode=plan needs --plan.devices=N (N >= 1)')
  simulate_host_devices(devices)
  from vitreg_jax.parallel import planner  # pylint: disable=import-outside-toplevel
  result = planner.plan_config(config, devices, FLAGS['plan.hbm_gib'].value)
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
