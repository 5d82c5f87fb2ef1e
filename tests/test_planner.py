"""The pod-scale planner.

* The TPU compiler (libtpu) on the compile-only devices of a v5e:2x2 slice:
  the DeiT-III smoke model through the library, the DINOv2 smoke recipe
  through the CLI (XLA:CPU on 4 simulated devices when libtpu is absent).
* The XLA:CPU fallback: 8 simulated devices in-process, 64 through the CLI,
  and ``--plan.topology`` without libtpu.
"""

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
from vitreg_jax.parallel import topology
from vitreg_jax.train import plan as plan_lib
from vitreg_jax import recipes
from vitreg_jax.train import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 64  # one image per device at 64 devices
EMBED = 64  # divides 4, 8 and 64, so every backbone param shards
CLI_OVERRIDES = ['--config.mesh.data=1', '--config.mesh.fsdp=-1', f'--config.model.embed_dim={EMBED}',
                 '--config.model.num_heads=4']
TOPOLOGY = 'v5e:2x2'  # 4 chips, one host
HAVE_LIBTPU = topology.libtpu_version() is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
# float32 images + int32 labels, per example
EXAMPLE_BYTES = 32 * 32 * 3 * 4 + 6 * 4  # image + soft targets over the 6 smoke classes


def plan_config():
  c = parallel_worker.load_config(f'smoke,batch={BATCH},strategy=fsdp')
  c.mesh.update({'data': 1, 'fsdp': -1, 'tensor': 1})
  c.model.embed_dim = EMBED
  c.model.num_heads = 4
  return c


def run_main(args, config=f'deit3_reg.py:smoke,batch={BATCH},strategy=fsdp', timeout=300,
             prelude=''):
  """``python -m vitreg_jax.main --mode=plan``; ``prelude`` runs first (e.g. hides libtpu)."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the planner sets its own device count
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
  command = [sys.executable, '-m', 'vitreg_jax.main']
  if prelude:
    command = [sys.executable, '-c',
               f'{prelude}; import runpy; runpy.run_module("vitreg_jax.main", run_name="__main__")']
  return subprocess.run(
      [*command, '--mode=plan', f'--config={REPO / "configs" / config}', *args],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _param_bytes(config) -> tuple[int, int]:
  """(all param bytes, bytes fsdp cannot shard: qkv biases have no embed axis, 6 classes)."""
  abstract = jax.eval_shape(recipes.build(config).init_state, jax.random.key(0))
  total = replicated = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state_lib.unbox(abstract.params)):
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    total += nbytes
    keys = jax.tree_util.keystr(path)
    if "['qkv']['bias']" in keys or keys == "['head']['bias']":
      replicated += nbytes
  return total, replicated


def _assert_self_consistent(p: dict, per_device_batch_bytes: int):
  """Memory numbers of a plan (as JSON) that must hold whatever the compiler."""
  state = sum(p['state_bytes'].values())
  assert p['peak_bytes'] == (p['argument_bytes'] + p['output_bytes'] - p['alias_bytes']
                             + p['temp_bytes'])
  # The state is donated: aliased to the outputs; the TPU pads small arrays to its tiles,
  # so its buffers are at least the logical bytes.
  assert state <= p['alias_bytes'] <= min(p['argument_bytes'], p['output_bytes'])
  # Arguments: the state's buffers, this device's batch rows and the rng key.
  assert p['argument_bytes'] >= p['alias_bytes'] + per_device_batch_bytes
  assert p['temp_bytes'] > 0
  assert p['fits'] == (p['peak_bytes'] <= p['hbm_bytes'])
  assert p['analytic_flops_per_device'] == pytest.approx(
      p['analytic_flops_per_step'] / p['num_devices'])


# --- the TPU compiler on a v5e:2x2 slice --------------------------------------------------

@pytest.fixture(scope='module')
def tpu_plan():
  if not HAVE_LIBTPU:
    pytest.skip("needs libtpu: pip install -e '.[tpu]'")
  # The CLI's (and a TPU run's) matmul precision, not the test session's 'highest': the
  # TPU emulates float32 matmuls with 6 bf16 passes then, and compiles 3x slower.
  with jax.default_matmul_precision(None):
    return plan_lib.plan_config(plan_config(), recipes.build, topology=TOPOLOGY)


@needs_libtpu
def test_tpu_plan_comes_from_the_tpu_compiler(tpu_plan):
  assert tpu_plan.compiler.startswith('TPU v5 lite (libtpu ') and tpu_plan.tpu_compiled
  assert (tpu_plan.topology, tpu_plan.num_devices, tpu_plan.num_hosts) == (TOPOLOGY, 4, 1)
  assert tpu_plan.mesh == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert tpu_plan.hbm_bytes == 16 * plan_lib.GIB  # v5e, from the device kind
  table = tpu_plan.table()
  assert f'compiler: TPU v5 lite (libtpu {topology.libtpu_version()}), for TPU topology ' \
         f'{TOPOLOGY} (1 host)' in table
  assert 'XLA:CPU' not in table


@needs_libtpu
def test_tpu_state_bytes_and_shard_shapes_are_exact(tpu_plan):
  config = plan_config()
  total, replicated = _param_bytes(config)
  assert tpu_plan.state_bytes['params'] == (total - replicated) / 4 + replicated
  assert 2 * tpu_plan.state_bytes['params'] <= tpu_plan.state_bytes['optimizer'] <= (
      2 * tpu_plan.state_bytes['params'] + 64)  # Adam's two moments + counters
  # The TPU mesh partitions every leaf as 4 CPU devices do.
  on_tpu = recipes.sharded(config, topology.devices(TOPOLOGY))
  on_cpu = recipes.sharded(config, jax.devices()[:4])
  assert {d.platform for d in on_tpu.mesh.devices.flat} == {'tpu'}
  assert plan_lib.state_bytes_per_device(on_cpu) == tpu_plan.state_bytes
  shard_shapes = lambda s: jax.tree.map(lambda x, sh: sh.shard_shape(x.shape),
                                        state_lib.unbox(s.abstract_state), s.state_shardings)
  assert shard_shapes(on_tpu) == shard_shapes(on_cpu)
  params = shard_shapes(on_tpu).params
  assert params['backbone']['blocks_0']['attn']['qkv']['kernel'] == (16, 3, 4, 16)
  assert params['backbone']['patch_embed']['proj']['kernel'] == (8, 8, 3, 16)
  assert params['backbone']['blocks_0']['mlp']['fc1']['bias'] == (64,)
  assert params['head']['bias'] == (6,)  # 6 classes do not split 4 ways


@needs_libtpu
def test_tpu_memory_and_flops_are_self_consistent(tpu_plan):
  _assert_self_consistent(tpu_plan.to_dict(), BATCH // 4 * EXAMPLE_BYTES)
  assert tpu_plan.fits
  # XLA also counts norms, softmax, GELU and the optimizer: a little above the matmuls.
  ratio = tpu_plan.xla_flops_per_device / tpu_plan.analytic_flops_per_device
  assert 1.0 < ratio < 1.3, ratio


def test_cli_plans_dinov2_on_a_tpu_topology(tmp_path):
  """The DINOv2 smoke recipe on v5e:2x2: the TPU compiler, or XLA:CPU without libtpu.

  Global crops only: the local-crop pass doubles the TPU compile (~70 s -> ~125 s
  on 2 busy cores) and runs the same code as the global one.
  """
  out = tmp_path / 'plan.json'
  result = run_main([f'--plan.topology={TOPOLOGY}', f'--plan.json={out}',
                     '--config.augment.local_crops_number=0'],
                    config='dinov2_reg.py:smoke', timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'global batch 32 (8 per device)' in result.stdout
  assert 'Failed to find host bounds' not in result.stderr  # libtpu's host discovery is quiet
  p = json.loads(out.read_text())
  assert p['tpu_compiled'] == HAVE_LIBTPU
  assert p['compiler'].startswith('TPU v5 lite' if HAVE_LIBTPU else 'XLA:CPU')
  assert p['hbm_bytes'] == 16 * plan_lib.GIB
  # Exact state bytes: the same partitioning as 4 CPU devices (no compile needed there).
  config = parallel_worker.load_config('smoke', 'dinov2_reg.py')
  config.augment.local_crops_number = 0
  on_cpu = recipes.sharded(config, jax.devices()[:4])
  assert p['state_bytes'] == plan_lib.state_bytes_per_device(on_cpu)
  assert p['state_bytes']['teacher'] == p['state_bytes']['params']  # the EMA mirrors the student
  assert {'center_dino', 'center_ibot'} <= set(p['state_bytes'])
  nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  _assert_self_consistent(p, nbytes(on_cpu.abstract_batch(32)) // 4)
  assert p['fits']


def test_cli_without_libtpu_falls_back_to_simulated_devices(tmp_path):
  out = tmp_path / 'plan.json'
  result = run_main([f'--plan.topology={TOPOLOGY}', f'--plan.json={out}', *CLI_OVERRIDES],
                    prelude='import sys; sys.modules["libtpu"] = None')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'libtpu is not installed' in result.stderr and ".[tpu]'" in result.stderr
  assert 'compiler: XLA:CPU' in result.stdout
  assert f'note: stands in for TPU topology {TOPOLOGY}' in result.stdout
  p = json.loads(out.read_text())
  assert (p['num_devices'], p['tpu_compiled'], p['hbm_bytes']) == (4, False, 16 * plan_lib.GIB)
  _assert_self_consistent(p, BATCH // 4 * EXAMPLE_BYTES)


@pytest.mark.parametrize('args, message', [
    (['--plan.topology=v5litepod-16'], "TPU topology 'v5litepod-16' is not GENERATION:AxB"),
    (['--plan.topology=v5e:2x2', '--plan.devices=4'], 'not both'),
    ([], '--mode=plan needs --plan.topology=v5e:16x16'),
])
def test_cli_plan_flags_fail_naming_the_valid_choices(args, message):
  result = run_main(args, timeout=120)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


# --- the XLA:CPU fallback on simulated devices ----------------------------------------------

@pytest.fixture(scope='module')
def plan8():
  return plan_lib.plan_config(plan_config(), recipes.build, 8, hbm_gib=16)


@pytest.fixture(scope='module')
def plan64(tmp_path_factory):
  out = tmp_path_factory.mktemp('plan') / 'plan64.json'
  result = run_main(['--plan.devices=64', '--plan.hbm_gib=16', f'--plan.json={out}',
                     *CLI_OVERRIDES])
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'plan: 64 devices, mesh data=1 x fsdp=64 x tensor=1, strategy fsdp' in result.stdout
  assert 'compiler: XLA:CPU' in result.stdout
  return json.loads(out.read_text())


def test_memory_analysis_is_per_device_and_matches_state(plan8):
  state = sum(plan8.state_bytes.values())
  per_device_batch = BATCH // 8 * EXAMPLE_BYTES
  # XLA's arguments are exactly this device's state shards and batch rows (+ <= 1 rng key).
  assert state + per_device_batch <= plan8.argument_bytes <= state + per_device_batch + 8
  # The state is donated: every state byte is aliased to an output.
  assert plan8.alias_bytes == state
  _assert_self_consistent(plan8.to_dict(), per_device_batch)
  assert 2 * plan8.state_bytes['params'] <= plan8.state_bytes['optimizer'] <= (
      2 * plan8.state_bytes['params'] + 64)
  assert plan8.compiler.startswith('XLA:CPU') and not plan8.tpu_compiled
  assert any('XLA:CPU estimates' in note for note in plan8.notes)


def test_fit_verdict_follows_hbm(plan8):
  assert plan8.fits
  tight = dataclasses.replace(plan8, hbm_bytes=plan8.peak_bytes - 1)
  assert not tight.fits and 'fits: NO' in tight.table()


def test_flops_xla_close_to_analytic(plan8):
  ratio = plan8.xla_flops_per_device / plan8.analytic_flops_per_device
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
  result = run_main(['--plan.devices=8', '--config.mesh.data=3', '--config.mesh.fsdp=2'],
                    timeout=120)
  assert result.returncode != 0
  assert 'config.mesh (data=3 x fsdp=2 x tensor=1) needs 6 devices but 8 are available' in (
      result.stderr)


def test_plan_refuses_wrong_device_count_or_both_targets():
  with pytest.raises(ValueError, match='planning for 64 devices but this process has 8'):
    plan_lib.plan_config(plan_config(), recipes.build, 64, hbm_gib=16)
  with pytest.raises(ValueError, match='not both or neither'):
    plan_lib.plan_config(plan_config(), recipes.build, 8, topology=TOPOLOGY)


# --- experiments/plan_pods.py: the README table ----------------------------------------------

def _plan_pods():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('plan_pods', REPO / 'experiments' / 'plan_pods.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_plan_pods_commands_keep_the_per_chip_batch():
  plan_pods = _plan_pods()
  case = plan_pods.Case.parse(
      'configs/dinov2_reg.py:variant=g/14 v5e:16x16 fsdp_tp full --config.group_size=16')
  argv = plan_pods.command(case, 16, ('--config.train.log_every=1',), 'P.json')
  assert argv[1:4] == ['-m', 'vitreg_jax.main', '--mode=plan']
  for flag in ('--plan.topology=v5e:16x16', '--config.data.batch_size=4096',
               '--config.sharding.strategy=fsdp_tp', '--config.mesh.tensor=4',
               '--config.mesh.fsdp=-1', '--config.model.remat_policy=full'):
    assert flag in argv, flag
  assert argv[-2:] == ['--config.train.log_every=1', '--config.group_size=16']
  small = plan_pods.Case.parse('configs/dinov2_reg.py:variant=L/14 v5e:8x8 fsdp')
  assert '--config.data.batch_size=1024' in plan_pods.command(small, 16, (), 'P.json')
  deit3 = plan_pods.Case.parse('configs/deit3_reg.py:smoke v5e:2x2 dp')
  argv = plan_pods.command(deit3, 4, (), 'P.json')
  assert '--config.data.batch_size=16' in argv and '--config.mesh.data=-1' in argv
  with pytest.raises(ValueError, match=r"strategy 'zero3'; valid"):
    plan_pods.Case.parse('configs/deit3_reg.py:smoke v5e:2x2 zero3')
  # The README rows: presets as shipped on v5e-256, the same per-chip batch on v5e-64.
  per_chip = {}
  for text in plan_pods.DEFAULT_CASES:
    case = plan_pods.Case.parse(text)
    argv = plan_pods.command(case, 0, (), 'P.json')
    flags = [a for a in argv if a.startswith('--config.data.batch_size=')]
    assert (case.topology == 'v5e:16x16') == (not flags), text  # 256 chips: no override
    variant = case.config.partition('variant=')[2]
    batch = int(flags[0].partition('=')[2]) if flags else {'L/14': 1024, 'g/14': 3072}[variant]
    per_chip.setdefault(variant, set()).add(batch / plan_pods.chips(case.topology))
  assert per_chip == {'L/14': {4.0}, 'g/14': {12.0}}


def test_plan_pods_table_has_one_row_per_case(plan8):
  plan_pods = _plan_pods()
  case = dataclasses.asdict(plan_pods.Case.parse('configs/deit3_reg.py:smoke v5e:2x2 fsdp'))
  rows = [{'case': case, 'command': 'x', 'plan': plan8.to_dict()},
          {'case': case, 'command': 'y', 'error': 'ValueError: boom'}]
  lines = plan_pods.table(rows).splitlines()
  assert len(lines) == 4 and len({line.count('|') for line in lines}) == 1
  assert 'fits 16 GiB' in lines[0] and 'model TFLOP/chip/step (analytic)' in lines[0]
  assert '| 64 (8) |' in lines[2] and '(simulated)' in lines[2]
  assert 'failed: ValueError: boom' in lines[3]
