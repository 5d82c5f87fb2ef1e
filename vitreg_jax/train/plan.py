"""Pod-scale memory planner: compile a recipe's train step for a pod, allocate nothing.

The step is lowered on abstract inputs (``ShapeDtypeStruct`` with shardings)
and compiled ahead of time; the compiler's memory analysis then gives the
per-device argument, output and temporary bytes, and its cost analysis the
FLOPs of the per-device program. State bytes per device are exact (shard
shapes of the params, optimizer state and recipe extras such as an EMA
teacher).

Two ways to get devices to compile for:

* ``topology='v5e:16x16'``: the compile-only devices of a TPU slice from
  libtpu (``parallel/topology.py``). The TPU compiler itself produces every
  number, on a host without TPUs. The primary plan.
* ``num_devices=N``: N simulated host devices (``XLA_FLAGS=
  --xla_force_host_platform_device_count=N``, set up by ``--plan.devices``),
  the fallback without libtpu. The partitioning, hence the state bytes, is the
  TPU run's; FLOPs and temporaries are XLA:CPU's view of the same program (the
  TPU fuses more; the CPU may keep bf16 matmul operands in float32).

XLA's cost analysis counts a scanned loop body once, so with scanned blocks
its FLOPs are about 1/depth of the real ones; the analytic model FLOPs
(``recipe.analytic_flops``) are the headline.
"""

import dataclasses
import json
import math
import time
from typing import Any

import jax
import numpy as np

from vitreg_jax.parallel import topology as topology_lib
from vitreg_jax.train import sharded as sharded_lib

GIB = 1024 ** 3
# HBM assumed for simulated devices when none is given: a v5e chip's.
DEFAULT_HBM_GIB = 16.0


def format_bytes(n: float) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 1024 ** 2), ('KiB', 1024)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{int(n)} B'


def format_flops(n: float) -> str:
  for unit, size in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if abs(n) >= size:
      return f'{n / size:.3g} {unit}'
  return f'{n:.3g} FLOP'


@dataclasses.dataclass
class Plan:
  """Per-device memory and FLOPs of one train step on a mesh."""
  num_devices: int
  mesh: dict[str, int]
  strategy: str
  global_batch_size: int
  state_bytes: dict[str, int]   # per device: params, optimizer, each recipe extra
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  hbm_bytes: int
  xla_flops_per_device: float
  analytic_flops_per_step: float
  compile_seconds: float
  compiler: str = ''            # who produced the memory / FLOP numbers
  topology: str | None = None   # the TPU topology compiled for; None: simulated devices
  num_slices: int = 1
  num_hosts: int = 1            # processes of the topology (a TPU host each)
  arch: str = ''
  remat_policy: str = ''
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs not aliased to (donated) arguments + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def tpu_compiled(self) -> bool:
    return self.topology is not None

  @property
  def analytic_flops_per_device(self) -> float:
    return self.analytic_flops_per_step / self.num_devices

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(peak_bytes=self.peak_bytes, fits=self.fits, tpu_compiled=self.tpu_compiled,
             analytic_flops_per_device=self.analytic_flops_per_device)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  def table(self) -> str:
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh.items())
    slices = f' x {self.num_slices} slices' if self.num_slices > 1 else ''
    hosts = f'{self.num_hosts} host' + ('s' if self.num_hosts > 1 else '')
    where = (f'TPU topology {self.topology}{slices} ({hosts})' if self.tpu_compiled
             else 'simulated host devices')
    rows = [(f'{k} (state)', v) for k, v in self.state_bytes.items()] + [
        ('arguments', self.argument_bytes),
        ('outputs not donated', self.output_bytes - self.alias_bytes),
        ('temporaries', self.temp_bytes),
        ('peak estimate', self.peak_bytes),
        ('HBM', self.hbm_bytes)]
    lines = [f'plan: {self.num_devices} devices, mesh {mesh}, strategy {self.strategy}, '
             f'global batch {self.global_batch_size} '
             f'({self.global_batch_size / self.num_devices:g} per device)',
             f'  compiler: {self.compiler}, for {where}',
             f'  model: {self.arch}, remat {self.remat_policy}',
             '  per device:']
    lines += [f'    {name:28s} {format_bytes(b):>12s}' for name, b in rows]
    lines.append(f'  fits: {"yes" if self.fits else "NO"} '
                 f'({100 * self.peak_bytes / self.hbm_bytes:.0f}% of HBM)')
    lines.append(f'  per device per step: {format_flops(self.analytic_flops_per_device)} '
                 f'(analytic, matmuls), {format_flops(self.xla_flops_per_device)} (XLA cost '
                 'analysis)')
    lines.append(f'  compile time {self.compile_seconds:.1f}s')
    lines += [f'  note: {n}' for n in self.notes]
    return '\n'.join(lines)


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  def one(x, s):
    return math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


def state_bytes_per_device(sharded: sharded_lib.ShardedRecipe) -> dict[str, int]:
  """Per-device bytes of each part of the train state."""
  state = sharded.abstract_sharded_state()
  shardings = sharded.state_shardings
  out = {'params': _per_device_bytes(state.params, shardings.params),
         'optimizer': _per_device_bytes(state.opt_state, shardings.opt_state)}
  for key in state.extras:
    out[key] = _per_device_bytes(state.extras[key], shardings.extras[key])
  out['step'] = _per_device_bytes(state.step, shardings.step)
  return out


def plan(sharded: sharded_lib.ShardedRecipe, global_batch_size: int, hbm_gib: float,
         strategy: str = '') -> Plan:
  """Compiles ``sharded``'s train step on abstract inputs and reports its memory."""
  device = sharded.mesh.devices.flat[0]
  start = time.perf_counter()
  compiled = sharded.lower(global_batch_size).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if memory is None:
    raise RuntimeError(f'the {device.platform} compiler gives no memory analysis')
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  tpu = device.platform == 'tpu'
  return Plan(
      num_devices=sharded.mesh.size, mesh=dict(sharded.mesh.shape), strategy=strategy,
      global_batch_size=global_batch_size, state_bytes=state_bytes_per_device(sharded),
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
      hbm_bytes=int(hbm_gib * GIB), xla_flops_per_device=float(cost.get('flops', 0.0)),
      analytic_flops_per_step=float(sharded.recipe.analytic_flops(global_batch_size)),
      compile_seconds=seconds, compiler=topology_lib.compiler_name(device),
      num_hosts=len({d.process_index for d in sharded.mesh.devices.flat}) if tpu else 1)


def _devices(num_devices: int | None, topology: str | None, num_slices: int) -> list[Any]:
  if (num_devices is None) == (topology is None):
    raise ValueError('plan for either a TPU topology (e.g. topology="v5e:16x16") or a number '
                     f'of simulated devices, not both or neither (got {topology!r}, '
                     f'{num_devices})')
  if topology is not None:
    return topology_lib.devices(topology, num_slices)
  if jax.device_count() != num_devices:
    raise ValueError(
        f'planning for {num_devices} devices but this process has {jax.device_count()}; run '
        f'`python -m vitreg_jax.main --mode=plan --plan.devices={num_devices} --config=...`, '
        'which simulates them')
  return jax.devices()


def plan_config(config, make_recipe, num_devices: int | None = None,
                hbm_gib: float | None = None, *, topology: str | None = None,
                num_slices: int = 1) -> Plan:
  """Plans ``make_recipe(config)`` on a TPU ``topology`` or on ``num_devices`` local devices.

  ``make_recipe`` (e.g. ``vitreg_jax.recipes.build``) sees the config as
  planned (attention impl resolved for the TPU).

  ``hbm_gib`` defaults to the TPU generation's HBM per chip (16 GiB for
  simulated devices). Attention 'auto' is planned as 'xla', the TPU choice,
  rather than the host's own.
  """
  devices = _devices(num_devices, topology, num_slices)
  notes = []
  if hbm_gib is None:
    if devices[0].platform == 'tpu':
      hbm_gib = topology_lib.hbm_gib(devices[0])
    else:
      hbm_gib = DEFAULT_HBM_GIB
      notes.append(f'HBM {hbm_gib:g} GiB per device assumed (a v5e chip); set --plan.hbm_gib')
  config = config.copy_and_resolve_references()
  if config.model.get('attention_impl', 'auto') == 'auto':
    config.model.attention_impl = 'xla'
    notes.append("attention_impl 'auto' planned as 'xla' (the TPU choice)")
  if config.model.get('scan_blocks', False):
    notes.append('scanned blocks: XLA cost analysis counts the loop body once, so its FLOPs '
                 'are about 1/depth of the real ones; the analytic count is the full step')
  if devices[0].platform != 'tpu':
    notes.append('temporaries and XLA FLOPs are XLA:CPU estimates; install libtpu '
                 "(pip install -e '.[tpu]') and plan with --plan.topology for the TPU's")
  sharded = sharded_lib.ShardedRecipe.from_config(make_recipe(config), config, devices)
  result = plan(sharded, sharded.recipe.global_batch_size, hbm_gib,
                strategy=config.sharding.strategy)
  result.topology, result.num_slices = topology, num_slices
  result.arch = str(config.model.get('arch', ''))
  result.remat_policy = str(config.model.get('remat_policy', 'none'))
  result.notes[:0] = notes
  return result
