"""Test-time registers for a ViT trained without registers (Jiang et al. 2025): find the
register neurons, then compare the model with and without the test-time token.

  python experiments/test_time_registers.py find --model dinov2:dinov2_vitl14_pretrain.pth \
      --data folder:imgs --detect-layer -2 --threshold 150 --highest-layer 17 --top-k 50 \
      --out /tmp/ttr                              # -> /tmp/ttr/register_neurons.json
  python experiments/test_time_registers.py report --model dinov2:dinov2_vitl14_pretrain.pth \
      --tt-registers /tmp/ttr/register_neurons.json --data tfds:voc/2007 --split test \
      --out /tmp/ttr_report                       # or --tt-registers dinov2_vitl14 (shipped)

``find``: outlier tokens (cls included) are those whose output of block
``--detect-layer`` has norm above ``--threshold`` (default: the valley of that
layer's norms, see artifacts.py); each MLP neuron's score is its mean |activation|
over an image's outliers, averaged over the images with outliers; the
``--top-k`` neurons in blocks <= ``--highest-layer`` are saved.
``report``: artifacts (norm histograms, outlier fraction at the plain model's
cutoff), attention maps of CLS and the test-time token, and LOST CorLoc,
without and with the token;
``results.md`` tabulates them. Every analysis CLI also takes ``--tt-registers``.
"""

import os
import sys


from vitreg_jax.analysis import artifacts, cli, register_neurons
from vitreg_jax.analysis.features import FeaturePass
from vitreg_jax.models import layers, test_time_registers

MODES = ('find', 'report')


def find_parser():
  p = cli.parser('find: the register neurons of a model, saved as register_neurons.json')
  p.prog = 'test_time_registers.py find'
  p.add_argument('--detect-layer', type=int, default=-2,
                 help='block whose output norms define the outliers (negative from the end)')
  p.add_argument('--threshold', type=float, default=None,
                 help='outlier norm at that block (default: the valley of its distribution)')
  p.add_argument('--highest-layer', type=int, default=-1,
                 help='neurons of blocks up to this one (0-indexed; -1: all blocks)')
  p.add_argument('--top-k', type=int, default=50, help='neurons kept')
  p.add_argument('--sparsity-filter', action='store_true',
                 help='keep a neuron only where it is below 0.5 on >= half of the tokens')
  p.add_argument('--num-tokens', type=int, default=1, help='test-time tokens to append')
  p.add_argument('--scale', type=float, default=1.0, help='scale of the moved activation')
  p.add_argument('--mode', choices=layers.NEURON_EDIT_MODES, default='zero',
                 help="what the patches' activations of the neurons become")
  return p


def report_parser():
  p = cli.parser('report: the model without and with its test-time registers')
  p.prog = 'test_time_registers.py report'
  p.add_argument('--lost-max-images', type=int, default=0,
                 help='images for LOST (0: the --max-images)')
  return p


def find(args) -> dict:
  model, variables = cli.load_model(args)
  if model.num_test_time_registers:
    raise ValueError('find runs on the unmodified model: drop --tt-registers')
  layer = args.detect_layer % model.depth
  threshold = args.threshold
  if threshold is None:
    norms = FeaturePass(model, ('layer_norms',)).over(
        variables, cli.batches(args, model, None), args.max_images)['layer_norms'][layer]
    threshold = artifacts.valley_cutoff(norms)
    if threshold is None:
      raise ValueError(f'block {layer} has no high-norm mode (no valley in its norms): give '
                       '--threshold, or the model has no artifacts to move')
  scores, images = register_neurons.neuron_scores(
      model, variables, cli.batches(args, model, None), detect_layer=layer, threshold=threshold,
      sparsity_filter=args.sparsity_filter, max_images=args.max_images)
  highest = args.highest_layer % model.depth
  ranked = register_neurons.rank(scores, highest_layer=highest, top_k=args.top_k)
  layers = register_neurons.group(ranked)
  found_with = {'model': args.model, 'data': args.data, 'split': args.split,
                'detect_layer': layer, 'threshold': threshold, 'highest_layer': highest,
                'top_k': args.top_k, 'sparsity_filter': args.sparsity_filter,
                'images_with_outliers': images,
                'ranking': [{'layer': l, 'neuron': n, 'score': s} for l, n, s in ranked]}
  path = os.path.join(args.out, 'register_neurons.json')
  test_time_registers.save(path, layers, num_tokens=args.num_tokens, scale=args.scale,
                           mode=args.mode, found_with=found_with)
  rows = [{'layer': l, 'neurons': ' '.join(map(str, v))} for l, v in layers.items()]
  table = cli.markdown_table(rows, ['layer', 'neurons'])
  cli.write_markdown(args.out, f'Register neurons of {args.model} (threshold {threshold:.4g} '
                     f'at block {layer}, {images} images with outliers)', table)
  print(table)
  print(f'wrote {path}')
  return {'path': path, 'layers': layers, 'threshold': threshold}


def report(args, argv) -> None:
  from importlib import util  # pylint: disable=import-outside-toplevel
  if not args.tt_registers:
    raise ValueError('report compares the model with its test-time registers: give --tt-registers')
  here = os.path.dirname(os.path.abspath(__file__))

  def run(name, extra):
    spec = util.spec_from_file_location(f'experiments_{name}', os.path.join(here, f'{name}.py'))
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(extra)

  base = _without(argv, '--tt-registers', '--out', '--lost-max-images')
  rows, cutoff = [], []
  for label, tt in (('without', []), ('with test-time registers', ['--tt-registers',
                                                                   args.tt_registers])):
    out = os.path.join(args.out, 'with' if tt else 'without')
    # one cutoff for both: the plain model's (given, or its valley)
    run('artifacts', [*base, *tt, *cutoff, '--out', f'{out}/artifacts'])
    if not cutoff and '--cutoff' not in base:
      found = _read(f'{out}/artifacts/artifacts.json')['before_final_norm']['cutoff']
      cutoff = [] if found is None else ['--cutoff', str(found)]
    run('attention_maps', [*base, *tt, '--figures', '4', '--out', f'{out}/attention'])
    lost_args = _without(base, '--size', '--resize', '--max-images')
    limit = args.lost_max_images or args.max_images
    run('lost', [*lost_args, *tt, *(['--max-images', str(limit)] if limit else []),
                 '--out', f'{out}/lost'])
    art = _read(f'{out}/artifacts/artifacts.json')
    before = art['before_final_norm']
    rows.append({'model': label, 'cutoff': before['cutoff'],
                 'outlier %': 100 * before['outlier_fraction'],
                 'max patch norm': before['norms'].get('max'),
                 'median patch norm': before['norms'].get('p50'),
                 'test-time token norm': (art['test_time_registers'].get('per_register') or
                                          [{}])[0].get('mean'),
                 'LOST CorLoc': _read(f'{out}/lost/lost.json')['settings'][0]['CorLoc']})
  cli.write_json(args.out, 'report.json', rows)
  table = cli.markdown_table(rows, list(rows[0]))
  cli.write_markdown(args.out, f'Test-time registers of {args.model}', table)
  print(table)


def _read(path):
  import json  # pylint: disable=import-outside-toplevel
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _without(argv, *options):
  """``argv`` without the given options and their values."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    name = arg.split('=', 1)[0]
    if name in options:
      skip = '=' not in arg
      continue
    out.append(arg)
  return out


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in MODES:
    if argv and argv[0] in ('-h', '--help'):
      print(__doc__)
      for parser in (find_parser(), report_parser()):
        parser.print_help()
      return 0
    print(f'usage: test_time_registers.py {{{",".join(MODES)}}} ... (--help)', file=sys.stderr)
    return 2
  mode, rest = argv[0], argv[1:]
  if mode == 'find':
    find(find_parser().parse_args(rest))
  else:
    report(report_parser().parse_args(rest), rest)
  return 0


if __name__ == '__main__':
  cli.run_as_script(main)
