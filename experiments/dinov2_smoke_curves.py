"""Learning curves of the DINOv2 smoke preset and its departures from upstream.

Trains ``configs/dinov2_reg.py:smoke`` with the overrides of each named
variant (one run at a time, each through the main job, so every curve is what
a user's run would log), then writes the teacher entropy (the collapse
monitor: ln K = uniform collapse), the DINO losses and kNN top-1 against the
step, as a markdown table and, when matplotlib is installed, a PNG.

  python experiments/dinov2_smoke_curves.py --out /tmp/curves                 # smoke vs upstream
  python experiments/dinov2_smoke_curves.py --out /tmp/curves --variants smoke --epochs 24
  python experiments/dinov2_smoke_curves.py --out /tmp/curves --variants smoke \\
      --extra smoke_t04=--config.teacher.teacher_temp=0.04

Variants (each a list of ``--config.*`` overrides on top of the smoke preset):
``smoke`` (as shipped) and one variant per departure from upstream, which puts
that value back to DINOv2's default; ``upstream`` puts them all back.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each departure of the smoke preset from ssl_default_config, as the override
# that restores the upstream value (configs/dinov2_reg.py documents why).
UPSTREAM_VALUES = {
    'layerscale': ['--config.model.layerscale_init=1e-05'],
    'teacher_temp': ['--config.teacher.warmup_teacher_temp=0.04',
                     '--config.teacher.teacher_temp=0.07'],
    'momentum': ['--config.teacher.momentum_teacher=0.992'],
}
VARIANTS = {
    'smoke': [],
    'upstream': [flag for flags in UPSTREAM_VALUES.values() for flag in flags],
    **{f'upstream_{name}': flags for name, flags in UPSTREAM_VALUES.items()},
}


def train(name: str, flags: list[str], out: str, epochs: int | None) -> str:
  workdir = os.path.join(out, name)
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    print(f'{name}: reusing {workdir}')
    return workdir
  command = [sys.executable, '-m', 'vitreg_jax.main', '--config=configs/dinov2_reg.py:smoke',
             f'--workdir={workdir}', "--config.train.export_formats=('vitreg',)", *flags]
  if epochs:
    command.append(f'--config.optim.epochs={epochs}')
  start = time.time()
  with open(os.path.join(out, f'{name}.log'), 'w', encoding='utf-8') as log:
    subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  print(f'{name}: trained in {time.time() - start:.0f} s ({" ".join(flags) or "as shipped"})')
  return workdir


def curves(workdir: str) -> dict[str, dict[int, float]]:
  series: dict[str, dict[int, float]] = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      for key in ('teacher_entropy', 'dino_global', 'dino_local', 'ibot', 'knn_top1'):
        if isinstance(record.get(key), float):
          series.setdefault(key, {})[record['step']] = record[key]
  return series


def table(results: dict[str, dict], prototypes: int) -> str:
  lines = [f'teacher entropy (ln K = {math.log(prototypes):.2f} is uniform collapse) and kNN '
           'top-1 (%) over training', '',
           '| variant | entropy @ 25% / 50% / 100% of steps | dino_local (end) | kNN top-1 at evals |',
           '|---|---|---|---|']
  for name, series in results.items():
    entropy = series.get('teacher_entropy', {})
    steps = sorted(entropy)
    marks = [steps[max(0, round(len(steps) * f) - 1)] for f in (0.25, 0.5, 1.0)] if steps else []
    knn = ', '.join(f'{v:.1f} (step {s})' for s, v in sorted(series.get('knn_top1', {}).items()))
    local = series.get('dino_local', {})
    lines.append(f'| {name} | ' + ' / '.join(f'{entropy[s]:.2f}' for s in marks)
                 + f' | {local[max(local)]:.3f} | {knn} |' if local else ' | - | {knn} |')
  return '\n'.join(lines)


def plot(results: dict[str, dict], prototypes: int, path: str) -> bool:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name, series in results.items():
    for ax, key in zip(axes, ('teacher_entropy', 'dino_local', 'knn_top1')):
      points = sorted(series.get(key, {}).items())
      if points:
        ax.plot(*zip(*points), marker='o' if key == 'knn_top1' else None, label=name)
  axes[0].axhline(math.log(prototypes), color='grey', linestyle='--', label='ln K (uniform)')
  for ax, title in zip(axes, ('teacher entropy', 'DINO local-crop loss', 'kNN top-1 (%)')):
    ax.set_title(title)
    ax.set_xlabel('step')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return True


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True)
  parser.add_argument('--variants', default='smoke,upstream',
                      help=f'comma list of {sorted(VARIANTS)}')
  parser.add_argument('--extra', action='append', default=[],
                      help='NAME=FLAG[ FLAG...]: one more variant')
  parser.add_argument('--epochs', type=int, default=None, help='override optim.epochs')
  parser.add_argument('--prototypes', type=int, default=256, help='K of the preset (for ln K)')
  args = parser.parse_args()
  variants = {}
  for name in args.variants.split(','):
    if name not in VARIANTS:
      parser.error(f'unknown variant {name!r}; valid: {sorted(VARIANTS)}')
    variants[name] = VARIANTS[name]
  for extra in args.extra:
    name, _, flags = extra.partition('=')
    variants[name] = flags.split()
  os.makedirs(args.out, exist_ok=True)
  results = {name: curves(train(name, flags, args.out, args.epochs))
             for name, flags in variants.items()}
  text = table(results, args.prototypes)
  with open(os.path.join(args.out, 'curves.md'), 'w', encoding='utf-8') as f:
    f.write(text + '\n')
  print(text)
  if plot(results, args.prototypes, os.path.join(args.out, 'curves.png')):
    print(f'figure: {os.path.join(args.out, "curves.png")}')


if __name__ == '__main__':
  main()
