"""The pod-scale planner: 8 devices in-process, 64 simulated devices through the CLI."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import parallel_worker
from vitreg_jax.parallel import planner
from vitreg_jax.train import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 64  # one image per device at 64 devices
EMBED = 64  # divides 8 and 64, so every backbone param shards
CLI_OVERRIDES = ['--config.mesh.data=1', '--config.mesh.fsdp=-1', f'--config.model.embed_dim={EMBED}']


def plan_config():
  c = parallel_worker.load_config(f'smoke,batch={BATCH},strategy=fsdp')
  c.mesh.update({'data': 1, 'fsdp': -1, 'tensor': 1})
  c.model.embed_dim = EMBED
  return c


def run_cli(args, timeout=300):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the planner sets its own device count
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
  return subprocess.run(
      [sys.executable, '-m', 'vitreg_jax.main', '--mode=plan',
       f'--config={REPO / "configs" / "supervised.py"}:smoke,batch={BATCH},strategy=fsdp', *args],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def plan8():
  return planner.plan_config(plan_config(), 8, hbm_gib=16)


@pytest.fixture(scope='module')
def plan64(tmp_path_factory):
  out = tmp_path_factory.mktemp('plan') / 'plan64.json'
  result = run_cli(['--plan.devices=64', '--plan.hbm_gib=16', f'--plan.json={out}',
                    *CLI_OVERRIDES])
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'plan: 64 devices, mesh data=1 x fsdp=64 x tensor=1, strategy fsdp' in result.stdout
  return json.loads(out.read_text())


def _param_bytes(config) -> tuple[int, int]:
  """(all param bytes, bytes fsdp cannot shard: qkv biases have no embed axis, 10 classes)."""
  from vitreg_jax.train import recipes  # pylint: disable=import-outside-toplevel
  abstract = jax.eval_shape(recipes.get_recipe(config).init_state, jax.random.key(0))
  total = replicated = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state_lib.unbox(abstract.params)):
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    total += nbytes
    keys = jax.tree_util.keystr(path)
    if "['qkv']['bias']" in keys or keys == "['head']['bias']":
      replicated += nbytes
  return total, replicated


def test_memory_analysis_is_per_device_and_matches_state(plan8):
  state = sum(plan8.state_bytes.values())
  per_device_batch = BATCH // 8 * (32 * 32 * 3 * 4 + 4)  # float32 images + int32 labels
  # XLA's arguments are exactly this device's state shards and batch rows (+ <= 1 rng key).
  assert state + per_device_batch <= plan8.argument_bytes <= state + per_device_batch + 8
  # The state is donated: every state byte is aliased to an output.
  assert plan8.alias_bytes == state
  assert plan8.temp_bytes > 0
  assert plan8.peak_bytes == (plan8.argument_bytes + plan8.output_bytes - plan8.alias_bytes
                              + plan8.temp_bytes)
  # Adam: two moments per param (+ the step counters).
  assert 2 * plan8.state_bytes['params'] <= plan8.state_bytes['optimizer'] <= (
      2 * plan8.state_bytes['params'] + 64)


def test_fit_verdict_follows_hbm(plan8):
  assert plan8.fits
  tight = dataclasses.replace(plan8, hbm_bytes=plan8.peak_bytes - 1)
  assert not tight.fits and 'fits: NO' in tight.table()


def test_flops_xla_close_to_analytic(plan8):
  ratio = plan8.xla_flops_per_device / plan8.analytic_flops_per_device
  # XLA also counts norms, softmax, GELU and the optimizer: a little above the matmuls.
  assert 1.0 < ratio < 1.3, ratio


def test_cli_64_devices_params_fall_as_one_over_n(plan8, plan64):
  total, replicated = _param_bytes(plan_config())
  assert replicated / total < 0.03
  p8, p64 = plan8.state_bytes['params'], plan64['state_bytes']['params']
  assert p8 == (total - replicated) / 8 + replicated
  assert p64 == (total - replicated) / 64 + replicated
  # The sharded part falls exactly as 1/N; the whole by 6.7x here (3% stays replicated).
  assert (p8 - replicated) / (p64 - replicated) == 8
  assert 6.5 < p8 / p64 <= 8
  assert plan64['num_devices'] == 64 and plan64['fits'] is True
  assert plan64['analytic_flops_per_step'] == pytest.approx(plan8.analytic_flops_per_step)
  np.testing.assert_allclose(plan64['xla_flops_per_device'] * 64,
                             plan8.xla_flops_per_device * 8, rtol=0.1)


def test_cli_bad_mesh_fails_at_start_up_naming_numbers():
  result = run_cli(['--plan.devices=8', '--config.mesh.data=3', '--config.mesh.fsdp=2'], timeout=120)
  assert result.returncode != 0
  assert 'config.mesh (data=3 x fsdp=2 x tensor=1) needs 6 devices but 8 are available' in (
      result.stderr)


def test_plan_refuses_wrong_device_count():
  with pytest.raises(ValueError, match='planning for 64 devices but this process has 8'):
    planner.plan_config(plan_config(), 64, hbm_gib=16)


def test_cli_plans_the_dinov2_recipe():
  """The README's DINOv2 plan command: the recipe reads its batch from data.batch_size."""
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'vitreg_jax.main', '--mode=plan', '--plan.devices=8',
       f'--config={REPO / "configs" / "dinov2_reg.py"}:smoke',
       '--config.ibot.group_size=4', '--config.dino.koleo_group_size=4'],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'global batch 32 (4 per device)' in result.stdout
  assert 'teacher' in result.stdout
