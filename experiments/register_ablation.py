"""The register ablation (paper Fig. 8): the analyses over checkpoints with 0/1/2/4/8/16 registers.

  python experiments/register_ablation.py --out /tmp/ablation \
      --models workdir:/tmp/r0 workdir:/tmp/r1 workdir:/tmp/r2 workdir:/tmp/r4 \
      -- --embedded image_size=48 --embedded num_classes=6 --size 32
  (train those with: python -m vitreg_jax.main --config=configs/dinov2_reg.py:smoke,registers=N
   --workdir=/tmp/rN)

Every option after ``--`` goes to each analysis (images, sizes ...). Runs
``artifacts``, ``lost``, ``knn`` and ``linear_probe`` (``--analyses``) for
each model into ``--out/<i>_<analysis>/``, then tabulates per model: the
number of registers, outlier fraction, LOST CorLoc, kNN and linear top-1
(``ablation.json``, ``results.md``, ``ablation.png``).
"""

import argparse
import importlib.util
import json
import os

ANALYSES = ('artifacts', 'lost', 'knn', 'linear_probe')
HERE = os.path.dirname(os.path.abspath(__file__))


def _experiment(name: str):
  spec = importlib.util.spec_from_file_location(f'experiments_{name}',
                                                os.path.join(HERE, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--models', nargs='+', required=True, metavar='FORMAT:PATH',
                 help='checkpoints (any format the analyses read, e.g. workdir:PATH)')
  p.add_argument('--analyses', nargs='+', choices=ANALYSES, default=list(ANALYSES),
                 help='which analyses to run on each model')
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('shared', nargs=argparse.REMAINDER,
                 help='after --: options passed to every analysis')
  args = p.parse_args(argv)
  args.shared = [a for a in args.shared if a != '--']
  return args


def args_for(name: str, shared: list[str]) -> list[str]:
  """``shared`` minus the crop options LOST (native resolution) does not take."""
  if name != 'lost':
    return list(shared)
  out, skip = [], False
  for arg in shared:
    if skip:
      skip = False
    elif arg in ('--size', '--resize'):
      skip = True
    elif not arg.startswith(('--size=', '--resize=')):
      out.append(arg)
  return out


def _read(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def summarise(folder: str, analyses) -> dict:
  """One row of the table from the analyses' JSON files in ``folder_<analysis>``."""
  row = {}
  if 'artifacts' in analyses:
    a = _read(f'{folder}_artifacts/artifacts.json')
    row.update(registers=a['num_registers'],
               **{'outlier %': 100 * a['before_final_norm']['outlier_fraction']})
  if 'lost' in analyses:
    row['LOST CorLoc'] = _read(f'{folder}_lost/lost.json')['settings'][0]['CorLoc']
  if 'knn' in analyses:
    row['kNN top1'] = max(r['top1'] for r in _read(f'{folder}_knn/knn.json')['top1'])
  if 'linear_probe' in analyses:
    row['linear top1'] = _read(f'{folder}_linear_probe/linear_probe.json')['best']['top1']
  return row


def main(argv=None) -> int:
  args = parse_args(argv)
  from vitreg_jax.analysis import cli, figures  # pylint: disable=import-outside-toplevel
  rows = []
  for i, model in enumerate(args.models):
    folder = os.path.join(args.out, f'{i}')
    for name in args.analyses:
      print(f'== {model}: {name}', flush=True)
      _experiment(name).main(['--model', model, '--out', f'{folder}_{name}',
                                *args_for(name, args.shared)])
    rows.append({'model': model, **summarise(folder, args.analyses)})
  cli.write_json(args.out, 'ablation.json', rows)
  columns = ['model'] + [c for c in rows[0] if c != 'model']
  table = cli.markdown_table(rows, columns)
  cli.write_markdown(args.out, 'Register ablation', table)
  if 'registers' in rows[0]:
    metrics = [c for c in columns if c not in ('model', 'registers')]
    figures.line_plot(os.path.join(args.out, 'ablation.png'), [r['registers'] for r in rows],
                      {m: [r[m] for r in rows] for m in metrics}, 'registers', 'value',
                      'register ablation')
  print(table)
  return 0


if __name__ == '__main__':
  from vitreg_jax.analysis import cli  # pylint: disable=g-import-not-at-top
  cli.run_as_script(main)
