"""Entry point: ``python -m vitreg_jax.main --config=configs/X.py:ARG --workdir=DIR --mode=MODE``.

The config names its recipe (``config.recipe``, see ``vitreg_jax/recipes``);
this module names none. The console shows progress, evaluations, warnings and
a closing summary (where checkpoints, metrics, TensorBoard events and exports
are; the commands to run next); third-party INFO logs (Orbax, absl) only with
``--verbosity=1``. A
config mistake (unknown key, invalid value) prints one line and exits with 2.

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
* ``export``: the latest readable checkpoint's exports in every format of
  ``config.train.export_formats`` (vitreg, dinov2, timm, hf) under ``WORKDIR/export``;
  CLIP also writes both towers for OpenCLIP (``export/clip_open_clip``).
* ``eval``: the recipe's evaluators (DINOv2: kNN top-1 and the high-norm-token
  fraction; DeiT-III: top-1; CLIP: zero-shot top-1) on the latest readable checkpoint
  (``--eval_random_init``: on the same network at random init, the baseline).

export and eval use the config saved with the checkpoint when ``--config`` is
omitted; with ``--config`` the two must agree (differences are named).
"""

import json
import math
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vitreg_jax import cpu_memory

MODES = ('train', 'plan', 'export', 'eval')

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/deit3_reg.py:smoke.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs (train, export).')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_bool('eval_random_init', False, 'eval: evaluate a freshly initialised network.')
flags.DEFINE_bool('allow_config_changes', False,
                  'train/export/eval: proceed although the config differs from the saved one.')
flags.DEFINE_string('plan.topology', None,
                    'plan: TPU slice to compile for with libtpu, e.g. v5e:16x16, v4:4x4x4.')
flags.DEFINE_integer('plan.slices', 1, 'plan: number of such slices (multi-slice over DCN).')
flags.DEFINE_integer('plan.devices', None, 'plan: number of simulated CPU devices instead.')
flags.DEFINE_float('plan.hbm_gib', None, 'plan: HBM per device in GiB; default: the TPU '
                   "generation's (v4 32, v5e 16, v5p 95, v6e 32), 16 for simulated devices.")
flags.DEFINE_string('plan.json', None, 'plan: also write the result as JSON to this path.')
flags.DEFINE_bool('keep_cpu_buffers', True,
                  'On the CPU backend, keep XLA\'s per-step temporaries mapped between steps '
                  '(1.4-1.9x faster steps; the process keeps its peak memory). See '
                  'vitreg_jax/cpu_memory.py.')
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
  from vitreg_jax import recipes  # pylint: disable=import-outside-toplevel
  from vitreg_jax.train import plan  # pylint: disable=import-outside-toplevel
  result = plan.plan_config(config, recipes.build, devices, hbm_gib, topology=name,
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


def saved_config(workdir: str):
  """The config saved with the newest readable checkpoint in ``workdir`` (export/eval)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from vitreg_jax import checkpoint  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise app.UsageError(f'no --config given and no checkpoints in {directory}')
  ckpt = checkpoint.RunCheckpointer(directory, save_every=1)
  try:
    saved = ckpt.saved_config()
  finally:
    ckpt.close()
  if saved is None:
    raise app.UsageError(f'no --config given and no readable saved config in {directory}')
  return ml_collections.ConfigDict(saved[0])


def run_mode(mode: str, config, workdir: str) -> None:
  initialize_distributed(config)
  from vitreg_jax import recipes  # pylint: disable=import-outside-toplevel
  from vitreg_jax.train import loop  # pylint: disable=import-outside-toplevel
  from vitreg_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    recipe = recipes.build(config)
  except ValueError as error:  # building reads only the config: any bad value is the config's
    raise ConfigError(str(error)) from None
  allow = FLAGS.allow_config_changes
  if mode == 'train':
    loop.run(recipe, config, workdir, allow_config_changes=allow)
  elif mode == 'export':
    loop.export(recipe, config, workdir, allow_config_changes=allow)
  else:
    metrics = loop.evaluate_checkpoint(recipe, config, workdir, FLAGS.eval_random_init,
                                       allow_config_changes=allow)
    print(json.dumps(metrics))


def _quiet_third_party_logs() -> None:
  """INFO from Orbax/absl only with --verbosity=1; warnings and errors always."""
  if FLAGS.verbosity < 1:
    logging.set_verbosity(logging.WARNING)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _quiet_third_party_logs()
  if FLAGS.keep_cpu_buffers:
    cpu_memory.keep_buffers_mapped()
  config, mode = FLAGS.config, FLAGS.mode
  if mode == 'plan':
    if config is None:
      raise app.UsageError('--mode=plan needs --config, e.g. --config=configs/dinov2_reg.py')
    run_plan(config)
    return
  if not FLAGS.workdir and not (mode == 'eval' and FLAGS.eval_random_init):
    raise app.UsageError(f'--mode={mode} needs --workdir')
  if config is None:
    if mode == 'train':
      raise app.UsageError('--config is required, e.g. --config=configs/dinov2_reg.py:smoke')
    config = saved_config(FLAGS.workdir)
  run_mode(mode, config, FLAGS.workdir)


def _one_line(error: BaseException) -> str:
  """The message as one line; a wrapped traceback (config_flags) gives way to its root cause."""
  while 'Traceback' in str(error) and (error.__cause__ or error.__context__):
    error = error.__cause__ or error.__context__
  text = str(error)
  if 'Traceback' in text:
    text = text.rstrip().splitlines()[-1]
  text = ' '.join(text.replace('\\n', ' ').replace("\\'", "'").split())
  return text.strip('\'"') or type(error).__name__


def _override_path(error: BaseException, argv) -> str | None:
  """The ``--config.a.b`` override an error is about (absl or ml_collections wording)."""
  match = re.search(r"flag '(?:-*)config\.([\w.]+)'", str(error))
  if match:
    return match.group(1)
  names = set(re.findall(r"'(\w+)'", str(error).replace("\\'", "'")))
  for arg in argv:
    m = re.match(r'--config\.([\w.]+)=', arg)
    if m and names & set(m.group(1).split('.')):
      return m.group(1)
  return None


def _unknown_config_key(path: str) -> str | None:
  """``a.b`` naming no field of the loaded config: the valid keys where it goes wrong."""
  config = FLAGS['config'].value
  if config is None:
    return None
  keys = path.split('.')
  node = config
  for i, key in enumerate(keys):
    if not hasattr(node, 'keys'):
      return None
    if key not in node:
      where = '.'.join(keys[:i]) or 'config'
      return (f'unknown config key {".".join(keys[:i + 1])}; valid keys of {where}: '
              f'{sorted(node.keys())}')
    node = node[key]
  return None


def parse_flags(argv):
  """absl's flag parsing, with a config mistake reported in one line (exit code 2)."""
  try:
    return FLAGS(argv)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as error:
    path = _override_path(error, argv)
    hint = re.search(r'Did you mean [^?]*\?', _one_line(error))
    message = (path and _unknown_config_key(path)) or (
        f'unknown config key {path}: {hint.group(0)}' if path and hint else
        f'--config.{path}: {_one_line(error)}' if path else _one_line(error))
    sys.stderr.write(f'error: {message}\n')
    sys.exit(2)


def run_main(argv) -> None:
  """``main`` with config errors raised while building the recipe reported in one line."""
  from vitreg_jax.checkpoint import ConfigMismatchError  # pylint: disable=import-outside-toplevel
  from vitreg_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    main(argv)
  except (ConfigError, ConfigMismatchError) as error:
    sys.stderr.write(f'error: {error}\n')
    sys.exit(2)


if __name__ == '__main__':
  app.run(run_main, flags_parser=parse_flags)
