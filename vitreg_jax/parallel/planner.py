"""Pod-scale memory planner: compile a recipe's train step for N devices, allocate nothing.

The step is lowered on abstract inputs (``ShapeDtypeStruct`` with shardings)
and compiled ahead of time; XLA's memory analysis then gives the per-device
argument, output and temporary bytes, and its cost analysis the FLOPs of the
per-device program. State bytes per device are exact (shard shapes of the
params, optimizer state and recipe extras such as an EMA teacher).

The devices are simulated host (CPU) devices —
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which
``python -m vitreg_jax.main --mode=plan --plan.devices=N`` sets up. (An
``AbstractMesh`` lowers without devices but cannot be compiled, and compiling
for a TPU topology without TPUs needs libtpu.) The partitioning, hence the
state bytes, is exactly the TPU run's; FLOPs and temporaries are the CPU
compiler's view of the same partitioned program: an estimate of the TPU's
(the TPU fuses more; the CPU may keep bf16 matmul operands in float32).
"""

import dataclasses
import json
import math
import time
from typing import Any

import jax
import numpy as np

from vitreg_jax.train import recipes
from vitreg_jax.train.sharded import ShardedRecipe

GIB = 1024 ** 3


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
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs not aliased to (donated) arguments + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def analytic_flops_per_device(self) -> float:
    return self.analytic_flops_per_step / self.num_devices

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(peak_bytes=self.peak_bytes, fits=self.fits,
             analytic_flops_per_device=self.analytic_flops_per_device)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  def table(self) -> str:
    mesh = ' x '.join(f'{k}={v}' for k, v in self.mesh.items())
    rows = [(f'{k} (state)', v) for k, v in self.state_bytes.items()] + [
        ('arguments (XLA)', self.argument_bytes),
        ('outputs not donated (XLA)', self.output_bytes - self.alias_bytes),
        ('temporaries (XLA)', self.temp_bytes),
        ('peak estimate', self.peak_bytes),
        ('HBM', self.hbm_bytes)]
    lines = [f'plan: {self.num_devices} devices, mesh {mesh}, strategy {self.strategy}, '
             f'global batch {self.global_batch_size} '
             f'({self.global_batch_size / self.num_devices:g} per device)',
             '  per device:']
    lines += [f'    {name:28s} {format_bytes(b):>12s}' for name, b in rows]
    lines.append(f'  fits: {"yes" if self.fits else "NO"} '
                 f'({100 * self.peak_bytes / self.hbm_bytes:.0f}% of HBM)')
    lines.append(f'  per device per step: {format_flops(self.xla_flops_per_device)} (XLA cost '
                 f'analysis), {format_flops(self.analytic_flops_per_device)} (analytic, matmuls)')
    lines.append(f'  compile time {self.compile_seconds:.1f}s')
    lines += [f'  note: {n}' for n in self.notes]
    return '\n'.join(lines)


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  def one(x, s):
    return math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


def state_bytes_per_device(sharded: ShardedRecipe) -> dict[str, int]:
  """Per-device bytes of each part of the train state."""
  state = sharded.abstract_sharded_state()
  shardings = sharded.state_shardings
  out = {'params': _per_device_bytes(state.params, shardings.params),
         'optimizer': _per_device_bytes(state.opt_state, shardings.opt_state)}
  for key in state.extras:
    out[key] = _per_device_bytes(state.extras[key], shardings.extras[key])
  out['step'] = _per_device_bytes(state.step, shardings.step)
  return out


def plan(sharded: ShardedRecipe, global_batch_size: int, hbm_gib: float,
         strategy: str = '') -> Plan:
  """Compiles ``sharded``'s train step on abstract inputs and reports its memory."""
  start = time.perf_counter()
  compiled = sharded.lower(global_batch_size).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  notes = []
  if memory is None:
    raise RuntimeError(f'the {jax.default_backend()} compiler gives no memory analysis')
  return Plan(
      num_devices=sharded.mesh.size, mesh=dict(sharded.mesh.shape), strategy=strategy,
      global_batch_size=global_batch_size, state_bytes=state_bytes_per_device(sharded),
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
      hbm_bytes=int(hbm_gib * GIB), xla_flops_per_device=float(cost.get('flops', 0.0)),
      analytic_flops_per_step=float(sharded.recipe.analytic_flops(global_batch_size)),
      compile_seconds=seconds, notes=notes)


def plan_config(config, num_devices: int, hbm_gib: float) -> Plan:
  """Plans ``config``'s recipe on ``num_devices`` devices of this process.

  The process must already have exactly that many devices (the CLI sets up
  simulated ones). Attention 'auto' is planned as 'xla', the TPU choice,
  rather than the CPU's own.
  """
  from vitreg_jax.train import sharded as sharded_lib  # pylint: disable=import-outside-toplevel
  if jax.device_count() != num_devices:
    raise ValueError(
        f'planning for {num_devices} devices but this process has {jax.device_count()}; run '
        f'`python -m vitreg_jax.main --mode=plan --plan.devices={num_devices} --config=...`, '
        'which simulates them')
  config = config.copy_and_resolve_references()
  notes = []
  if config.model.get('attention_impl', 'auto') == 'auto':
    config.model.attention_impl = 'xla'
    notes.append("attention_impl 'auto' planned as 'xla' (the TPU choice)")
  if config.model.get('scan_blocks', False):
    notes.append('scanned blocks: XLA cost analysis counts the loop body once, so its FLOPs '
                 'are about 1/depth of the real ones; the analytic count is the full step')
  sharded = sharded_lib.from_config(config)
  result = plan(sharded, recipes.global_batch_size(config), hbm_gib,
                strategy=config.sharding.strategy)
  result.notes[:0] = notes
  return result
