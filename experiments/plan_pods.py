"""Regenerates the README's pod table: one ``--mode=plan`` compile per case, as markdown + JSON.

Each case is a config, a TPU topology, a strategy and optionally a remat
policy. The planner runs in a subprocess per case, one at a time (a ViT-g
compile for 256 chips takes minutes and both cores of a small host), with
the TPU compiler when libtpu is installed and XLA:CPU on simulated devices
otherwise (the table says which). Each case keeps its config's global batch
unless it overrides it, or ``--per_chip_batch`` sets it to that x chips for
every case.

  python experiments/plan_pods.py --out=experiments/pod_plan.md            # default cases
  python experiments/plan_pods.py --out=/tmp/t.md --per_chip_batch=4 \\
      --case='configs/deit3_reg.py:smoke v5e:2x2 fsdp'                     # a tiny check
  python experiments/plan_pods.py --out=t.md \\
      --case='configs/dinov2_reg.py:variant=L/14 v5e:16x16 fsdp_tp:4 full --config.group_size=16'

A case is 'CONFIG TOPOLOGY STRATEGY [REMAT] [--config.key=value ...]': STRATEGY
is dp, fsdp or fsdp_tp[:TENSOR] (tensor size, default 4); REMAT one of the
model's remat policies, or omitted for the config's own. ``--override`` adds
flags to every case. ``--reuse`` keeps the rows of an earlier JSON whose
command is unchanged, so an interrupted table resumes where it stopped.
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3
MIB = 1024 ** 2
STRATEGIES = ('dp', 'fsdp', 'fsdp_tp')
# The README's DINOv2 rows: each preset as shipped on v5e-256 (no overrides:
# L/14 1024 images = 4 per chip, g/14 3072 = 12 per chip, the reference's
# batch), the same per-chip batch on v5e-64, and the tensor-parallel variant.
_PRESET_BATCH = {'L/14': 1024, 'g/14': 3072}
DEFAULT_CASES = tuple(
    f'configs/dinov2_reg.py:variant={variant} {topology} {strategy}{extra}'
    for variant, batch in _PRESET_BATCH.items()
    for topology, strategy, extra in (
        ('v5e:16x16', 'fsdp', ''),
        ('v5e:8x8', 'fsdp', f' --config.data.batch_size={batch // 4}'),
        ('v5e:16x16', 'fsdp_tp:4', '')))


@dataclasses.dataclass
class Case:
  config: str        # configs/FILE.py:ARG
  topology: str      # v5e:16x16
  strategy: str      # dp | fsdp | fsdp_tp
  tensor: int        # the mesh's tensor size
  remat: str | None  # None: the config's own
  overrides: tuple[str, ...]

  @classmethod
  def parse(cls, text: str) -> 'Case':
    words = shlex.split(text)
    flags = tuple(w for w in words if w.startswith('--'))
    words = [w for w in words if not w.startswith('--')]
    if len(words) not in (3, 4):
      raise ValueError(f'case {text!r}: expected CONFIG TOPOLOGY STRATEGY [REMAT] [--flags]')
    strategy, _, tensor = words[2].partition(':')
    if strategy not in STRATEGIES:
      raise ValueError(f'case {text!r}: strategy {strategy!r}; valid: {STRATEGIES} '
                       '(fsdp_tp:N for tensor size N)')
    if tensor and strategy != 'fsdp_tp':
      raise ValueError(f'case {text!r}: only fsdp_tp takes a tensor size')
    return cls(words[0], words[1], strategy, int(tensor or (4 if strategy == 'fsdp_tp' else 1)),
               words[3] if len(words) == 4 else None, flags)


def chips(topology: str) -> int:
  dims = topology.partition(':')[2]
  return math.prod(int(d) for d in dims.split('x'))


def command(case: Case, per_chip_batch: int, overrides: tuple[str, ...], json_path: str):
  """The ``vitreg_jax.main --mode=plan`` command line of one case."""
  mesh = {'dp': (-1, 1, 1), 'fsdp': (1, -1, 1), 'fsdp_tp': (1, -1, case.tensor)}[case.strategy]
  args = [sys.executable, '-m', 'vitreg_jax.main', '--mode=plan',
          f'--config={case.config}', f'--plan.topology={case.topology}',
          f'--plan.json={json_path}', f'--config.sharding.strategy={case.strategy}',
          *(f'--config.mesh.{axis}={size}' for axis, size in zip(('data', 'fsdp', 'tensor'), mesh))]
  if per_chip_batch:
    args.append(f'--config.data.batch_size={per_chip_batch * chips(case.topology)}')
  if case.remat:
    args.append(f'--config.model.remat_policy={case.remat}')
  return args + list(overrides) + list(case.overrides)


def shown(case: Case, args) -> str:
  """The case's command as the table lists it (and ``--reuse`` matches it)."""
  argv = command(case, args.per_chip_batch, tuple(args.override), 'PLAN.json')
  return ' '.join(shlex.quote(a) for a in argv[1:])


def run_case(case: Case, args) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    json_path = os.path.join(tmp, 'plan.json')
    argv = command(case, args.per_chip_batch, tuple(args.override), json_path)
    row = {'case': dataclasses.asdict(case), 'command': shown(case, args)}
    print(f'planning: {row["command"]}', file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
      result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
      return dict(row, error=f'timed out after {args.timeout} s')
    row['seconds'] = round(time.perf_counter() - start, 1)
    if result.returncode != 0:
      lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
      return dict(row, error=(lines[-1] if lines else f'exit code {result.returncode}')[:300])
    with open(json_path, encoding='utf-8') as f:
      return dict(row, plan=json.load(f))


def _mib(n: int) -> str:
  return f'{n / MIB:.1f}'


def table(rows: list[dict]) -> str:
  """The markdown table: analytic model FLOPs per chip are the headline FLOP column."""
  hbm = {r['plan']['hbm_bytes'] for r in rows if 'plan' in r}
  fits = f'fits {hbm.pop() / GIB:g} GiB' if len(hbm) == 1 else 'fits HBM'
  header = ['arch', 'chips', 'topology', 'strategy', 'mesh data×fsdp×tensor',
            'global batch (per chip)', 'remat', 'params / optimizer / teacher per chip (MiB)',
            'temporaries (GiB)', 'peak (GiB)', fits, 'model TFLOP/chip/step (analytic)',
            'XLA TFLOP/chip/step', 'compiler']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    case = r['case']
    if 'plan' not in r:
      lines.append(f"| {case['config']} | {chips(case['topology'])} | {case['topology']} | "
                   f"{case['strategy']} | failed: {r['error']} |" + ' |' * (len(header) - 5))
      continue
    p = r['plan']
    state = p['state_bytes']
    mesh = '×'.join(str(v) for v in p['mesh'].values())
    lines.append('| ' + ' | '.join([
        p['arch'], str(p['num_devices']), case['topology'], p['strategy'], mesh,
        f"{p['global_batch_size']} ({p['global_batch_size'] / p['num_devices']:g})",
        p['remat_policy'],
        ' / '.join(_mib(state.get(k, 0)) for k in ('params', 'optimizer', 'teacher')),
        f"{p['temp_bytes'] / GIB:.2f}", f"{p['peak_bytes'] / GIB:.2f}",
        'yes' if p['fits'] else '**no**',
        f"{p['analytic_flops_per_device'] / 1e12:.2f}",
        f"{p['xla_flops_per_device'] / 1e12:.2f}",
        p['compiler'] + ('' if p['tpu_compiled'] else ' (simulated)')]) + ' |')
  return '\n'.join(lines)


NOTES = """\
State bytes are exact (shard shapes). Temporaries, peak and XLA FLOPs are the
compiler's own numbers: the TPU compiler (libtpu) on the topology's
compile-only devices, or, marked "simulated", XLA:CPU on as many simulated
devices. Peak = arguments + outputs not donated + temporaries. The model
TFLOP column is the analytic matmul count (forward + backward, no remat) per
chip per step; XLA's cost analysis counts a scanned loop body (the blocks)
once, so its column is far lower for scanned models and is shown only as a
cross-check."""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='markdown table to write')
  parser.add_argument('--json', help='also the rows as JSON (default: OUT with .json)')
  parser.add_argument('--case', action='append', help='a case; repeat; default: the DINOv2 '
                      'L/14 and g/14 presets on v5e:16x16 (fsdp, fsdp_tp) and v5e:8x8 (fsdp)')
  parser.add_argument('--per_chip_batch', type=int, default=0,
                      help='global batch = this x chips; 0 (default) keeps each case\'s batch')
  parser.add_argument('--override', action='append', default=[],
                      help='a --config.key=value flag for every case; repeat')
  parser.add_argument('--timeout', type=int, default=1800, help='seconds per case')
  parser.add_argument('--reuse', action='store_true',
                      help='keep rows of the existing JSON whose command is unchanged')
  args = parser.parse_args()
  cases = [Case.parse(c) for c in (args.case or DEFAULT_CASES)]
  json_path = args.json or os.path.splitext(args.out)[0] + '.json'
  for path in (args.out, json_path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  previous = {}
  if args.reuse and os.path.exists(json_path):
    with open(json_path, encoding='utf-8') as f:
      previous = {r['command']: r for r in json.load(f)['rows'] if 'plan' in r}
  rows = []
  for i, case in enumerate(cases):
    row = previous.get(shown(case, args)) or run_case(case, args)
    rows.append(row)
    status = row.get('error') or f"peak {row['plan']['peak_bytes'] / MIB:.1f} MiB"
    print(f'[{i + 1}/{len(cases)}] {case.config} {case.topology} {case.strategy}: {status}',
          file=sys.stderr, flush=True)
    with open(json_path, 'w', encoding='utf-8') as f:  # after every case: resumable
      json.dump({'per_chip_batch': args.per_chip_batch, 'rows': rows}, f, indent=1)
  with open(args.out, 'w', encoding='utf-8') as f:
    f.write(table(rows) + '\n\n' + NOTES + '\n\nCommands (one per row):\n\n')
    f.write('\n'.join(f'    python {r["command"]}' for r in rows) + '\n')
  print(f'wrote {args.out} and {json_path}', file=sys.stderr)


if __name__ == '__main__':
  main()
