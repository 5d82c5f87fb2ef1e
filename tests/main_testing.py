"""Running ``python -m vitreg_jax.main`` as a user would, and reading what the run leaves."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict:
  """One CPU device, as a laptop user has (the test session simulates 8)."""
  return dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')


def command(*args, config=None) -> list[str]:
  config_flag = [f'--config={config}'] if config else []
  return [sys.executable, '-m', 'vitreg_jax.main', *config_flag, *args]


def run_main(*args, config=None, timeout=1800, check=True) -> subprocess.CompletedProcess:
  """The finished process; ``check`` asserts it succeeded (with its stderr's tail)."""
  result = subprocess.run(command(*args, config=config), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def last_json(result) -> dict:
  """The metrics ``--mode=eval`` prints as its last stdout line."""
  return json.loads(result.stdout.strip().splitlines()[-1])


def step_losses(workdir) -> dict[int, float]:
  """Per-step loss; a step logged twice (before a kill, after resume) keeps the later value."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if 'loss' in record:
        losses[record['step']] = record['loss']
  return losses


def metric_records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def train_then_evaluate(config, workdir, metric):
  """The README command on ``config``, then ``--mode=eval`` of its checkpoint and of the
  same network at random init: ``(curve {step: metric}, trained, baseline, records)``."""
  run_main(f'--workdir={workdir}', config=config)
  trained = last_json(run_main(f'--workdir={workdir}', '--mode=eval', config=config))
  baseline = last_json(run_main('--mode=eval', '--eval_random_init', config=config))
  records = metric_records(workdir)
  curve = {r['step']: r[metric] for r in records if metric in r}
  return curve, trained, baseline, records
