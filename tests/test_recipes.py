"""Every registered recipe through ``python -m vitreg_jax.main``: train, checkpoint, resume, export.

One test per recipe of ``vitreg_jax.recipes.REGISTRY``, run from its
``configs/NAME_reg.py:smoke`` preset shortened to 6 steps (checkpoints at 3
and 6). The step-6 checkpoint is then removed and the run resumed from step 3:
it must repeat steps 4-6 exactly. Export (without ``--config``: the saved
config is used) and eval then run on the result, and a config that differs
from the saved one is refused, naming the keys. A new recipe is covered by
adding it to the registry with its config file.
"""

import glob
import os
import shutil

import main_testing
import pytest

from vitreg_jax import config as config_lib
from vitreg_jax import recipes

REPO = main_testing.REPO
SHORT = ['--config.optim.epochs=2', '--config.optim.epoch_length=3',
         '--config.optim.warmup_epochs=1', '--config.train.log_every=1',
         '--config.train.checkpoint_every=3', '--config.train.eval_every=0',
         "--config.train.export_formats=('vitreg', 'timm')",
         '--config.eval.max_train_examples=32', '--config.eval.max_eval_examples=32',
         '--config.data.batch_size=8']
EXTRA = {'dinov2': ['--config.group_size=8', '--config.teacher.warmup_teacher_temp_epochs=1']}


def _config_file(name):
  return f'configs/{name}_reg.py'


def _load(path, arg='smoke'):
  return config_lib.from_file(os.path.join(REPO, path), arg)


def _main(workdir, *args, config=None):
  return main_testing.run_main(f'--workdir={workdir}', *args, config=config, timeout=600,
                               check=False)


def test_every_config_file_names_a_registered_recipe():
  files = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
  named = {os.path.basename(f): _load(os.path.relpath(f, REPO)).recipe for f in files}
  assert set(named.values()) == set(recipes.REGISTRY), named
  for name in recipes.REGISTRY:
    assert os.path.exists(os.path.join(REPO, _config_file(name))), name
  for path in files:  # every smoke preset builds its recipe
    recipes.build(_load(os.path.relpath(path, REPO)))


def _check_summary(stdout, workdir):
  """The run's last lines name every place it wrote (all exist) and the commands to run next."""
  summary = stdout[stdout.index('finished at step'):].splitlines()
  places = dict(map(str.strip, line.split(': ', 1)) for line in summary[1:]
                if line.startswith('  ') and ': ' in line)
  assert {'checkpoints', 'metrics', 'tensorboard', 'export backbone'} <= set(places), summary
  written = [p for key, value in places.items() if key in ('checkpoints', 'metrics', 'tensorboard')
             or key.startswith('export ') for p in value.split(', ')]
  assert all(os.path.exists(p) for p in written), summary
  assert places['tensorboard'] == os.path.join(workdir, 'tensorboard')
  assert 'next:' in summary
  assert f'python -m vitreg_jax.main --mode=eval --workdir={workdir}' in stdout
  assert f'--model workdir:{workdir}' in stdout  # the analyses, on the vitreg export


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(recipes.REGISTRY))
def test_recipe_trains_checkpoints_resumes_and_exports(name, tmp_path):
  config = f'{_config_file(name)}:smoke'
  flags = SHORT + EXTRA.get(name, [])
  workdir = str(tmp_path / 'run')
  first = _main(workdir, *flags, config=config)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'finished at step 6 of 6' in first.stdout
  _check_summary(first.stdout, workdir)
  assert 'INFO' not in first.stderr + first.stdout  # the console stays quiet by default
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) == [3, 6]
  uninterrupted = main_testing.step_losses(workdir)
  assert sorted(uninterrupted) == list(range(1, 7))

  shutil.rmtree(os.path.join(checkpoints, '6'))
  resumed = _main(workdir, *flags, config=config)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from step 3 of 6' in resumed.stderr
  assert main_testing.step_losses(workdir) == uninterrupted  # steps 4-6 again, exactly

  shutil.rmtree(os.path.join(workdir, 'export'))
  export = _main(workdir, '--mode=export')  # no --config: the saved one
  assert export.returncode == 0, export.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, 'export', 'vitreg', 'config.json'))
  assert os.path.exists(os.path.join(workdir, 'export', 'timm_model.safetensors'))

  evaluation = _main(workdir, '--mode=eval')
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  metrics = main_testing.last_json(evaluation)
  assert metrics and all(isinstance(v, float) for v in metrics.values())

  mismatch = _main(workdir, '--mode=eval', *flags, '--config.data.batch_size=16',
                   '--config.optim.base_lr=0.5', config=config)
  assert mismatch.returncode == 2 and 'Traceback' not in mismatch.stderr
  message = mismatch.stderr.strip().splitlines()[-1]
  assert 'data.batch_size: saved 8, now 16' in message and 'optim.base_lr: saved' in message
