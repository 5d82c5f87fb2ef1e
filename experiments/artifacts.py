"""High-norm artifact tokens of any checkpoint (paper Fig. 3, 4a, 5a, 15).

  python experiments/artifacts.py --model timm:model.safetensors --data embedded --out /tmp/art
  python experiments/artifacts.py --model workdir:/tmp/vitreg_smoke --embedded image_size=48 \
      --size 32 --out /tmp/art_smoke

Writes ``artifacts.json`` (per-layer norm distributions, the cutoff given or
found at the valley, outlier fraction, their share on the border and in the
background, the patch-embedding cosine with the 4 neighbours of outliers vs
normal patches, register norms), ``norm_histogram.png`` (before / after the
final norm), ``layer_norms.png`` and ``results.md``.
"""


import numpy as np

from vitreg_jax.analysis import artifacts, cli, figures
from vitreg_jax.analysis.features import FeaturePass

OUTPUTS = ('prenorm_norms', 'patch_norms', 'layer_norms', 'patch_neighbour_cos')


def parse_args(argv):
  p = cli.parser(__doc__.split('\n\n')[0])
  p.add_argument('--cutoff', type=float, default=None,
                 help='outlier cutoff on the norm before the final norm (default: the valley of '
                      'the distribution; 150 is the paper\'s for DINOv2 ViT-g)')
  p.add_argument('--factor', type=float, default=0.0,
                 help='instead, outliers above FACTOR x the image\'s median patch norm')
  return p.parse_args(argv)


def analyse(model, variables, args) -> dict:
  mesh, rules = cli.mesh_and_rules()
  arrays = FeaturePass(model, OUTPUTS, mesh, rules).over(
      variables, cli.batches(args, model, mesh), args.max_images, progress=True,
      keep=('label', 'index'))
  where, regs = model.token_slices(), model.num_registers
  prenorm_patches = arrays['prenorm_norms'][:, where['patches']]
  grid = (args.size // model.patch_size,) * 2
  if args.factor:
    cutoff_per_image = args.factor * np.median(prenorm_patches, axis=1, keepdims=True)
    norms_for_cut, cutoff = prenorm_patches / cutoff_per_image, 1.0
    how = f'{args.factor} x median'
  else:
    cutoff = args.cutoff if args.cutoff is not None else artifacts.valley_cutoff(prenorm_patches)
    norms_for_cut = prenorm_patches
    how = 'given' if args.cutoff is not None else 'valley'
  boxes = _boxes(args, arrays['index'])
  stats = artifacts.patch_statistics(norms_for_cut, cutoff, grid, boxes,
                                     arrays['patch_neighbour_cos'])
  stats['cutoff_kind'] = how
  stats['norms'] = artifacts.distribution(prenorm_patches)
  return {
      'model': args.model, 'random_init': args.random_init, 'tt_registers': args.tt_registers,
      'images': len(prenorm_patches),
      'grid': grid, 'num_registers': regs,
      'before_final_norm': stats,
      'after_final_norm': {'cutoff': artifacts.valley_cutoff(arrays['patch_norms']),
                           'norms': artifacts.distribution(arrays['patch_norms'])},
      'registers': artifacts.register_statistics(
          arrays['prenorm_norms'][:, where['registers']], prenorm_patches,
          None if args.factor else cutoff),
      'test_time_registers': artifacts.register_statistics(
          arrays['prenorm_norms'][:, where['test_time_registers']], prenorm_patches,
          None if args.factor else cutoff),
      'per_layer': artifacts.per_layer(arrays['layer_norms'], where),
  }, arrays


def _boxes(args, indices):
  """Ground-truth boxes in the cropped frame, when the source has any."""
  src = cli.source(args)
  result = []
  for i in indices:
    record = src[int(i)]
    b = np.asarray(record.get('boxes', np.zeros((0, 4))))
    if not len(b):
      result.append(b.reshape(0, 4))
      continue
    result.append(cli.crop_boxes(b, cli.image_size(record), args.resize or args.size, args.size))
  return result if any(len(b) for b in result) else None


def main(argv=None) -> int:
  args = parse_args(argv)
  model, variables = cli.load_model(args)
  results, arrays = analyse(model, variables, args)
  prefix = model.num_prefix_tokens
  before = results['before_final_norm']
  figures.norm_histogram(f'{args.out}/norm_histogram.png', {
      'patches, before final norm': arrays['prenorm_norms'][:, prefix:],
      'patches, after final norm': arrays['patch_norms']},
      None if args.factor else before['cutoff'], title=args.model)
  figures.layer_norms(f'{args.out}/layer_norms.png', results['per_layer'], title=args.model)
  cli.write_json(args.out, 'artifacts.json', results)
  row = {'model': args.model + (' (random init)' if args.random_init else '')
         + (f' + test-time registers {args.tt_registers}' if args.tt_registers else ''),
         'registers': model.num_registers, 'cutoff': before['cutoff'],
         'outlier %': 100 * before['outlier_fraction'],
         'on border %': _pct(before.get('outliers_on_border')),
         'in background %': _pct(before.get('outliers_in_background')),
         'neighbour cos outliers': before.get('neighbour_cosine_outliers', {}).get('mean'),
         'neighbour cos normal': before.get('neighbour_cosine_normal', {}).get('mean')}
  table = cli.markdown_table([row], list(row))
  cli.write_markdown(args.out, 'High-norm tokens', table)
  print(table)
  return 0


def _pct(x):
  return None if x is None else 100 * x


if __name__ == '__main__':
  cli.run_as_script(main)
