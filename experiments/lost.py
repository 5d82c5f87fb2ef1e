"""LOST object discovery and CorLoc for any checkpoint (paper Table 3; REFERENCE §5, §12).

  python experiments/lost.py --model dinov2:dinov2_vitl14_reg4_pretrain.pth --dataset voc07 \
      --out /tmp/lost_voc07                        # tfds voc/2007 train+validation, prepared
  python experiments/lost.py --model workdir:/tmp/vitreg_smoke --embedded image_size=48 --out /tmp/l
  python experiments/lost.py --model open_clip:ViT-B-16.pt --arch ViT-B-16 --features v \
      --mean-std openai --layers -1 -2 -3 -4 --bias 0 -0.5 -1 --normalise --dataset voc12 --out ...

One box per image from the last block's keys (``--features``), cls and
registers dropped, at native resolution zero-padded to the patch multiple
(one compile per padded size), CorLoc = % of images with IoU >= 0.5 to any
ground-truth box. ``--layers``/``--bias``/``--normalise`` sweep the register
papers' options (every combination is reported; the first is the default
setting whose per-image boxes are saved). Writes ``lost.json``,
``results.md`` and ``boxes/*.png``.
"""

import itertools
import os
import sys
import time

import numpy as np

from vitreg_jax.analysis import cli, figures, lost, lost_data
from vitreg_jax.analysis.features import FeaturePass
from vitreg_jax.data import decode, transforms

FEATURES = ('k', 'q', 'v', 'tokens')


def parse_args(argv):
  p = cli.parser(__doc__.split('\n\n')[0], native=True)
  p.add_argument('--dataset', choices=sorted(lost_data.PRESETS),
                 help='a paper set through tfds (sets --data and --split): '
                      + ', '.join(f'{k} = {v[0]} {v[1]}' for k, v in lost_data.PRESETS.items()))
  p.add_argument('--features', choices=FEATURES, default='k',
                 help='qkv projection output (bias in, heads concatenated) or block output tokens')
  p.add_argument('--layers', type=int, nargs='+', default=[-1],
                 help='blocks to read (negative from the end; -1 -2 -3 -4: the last four)')
  p.add_argument('--bias', type=float, nargs='+', default=[0.0],
                 help='added to F F^T before the degrees (Darcet / Jiang et al. sweep)')
  p.add_argument('--normalise', action='store_true', help='L2-normalise features first')
  p.add_argument('--k-patches', type=int, default=lost.K_PATCHES,
                 help='lowest-degree patches compared with the seed')
  p.add_argument('--figures', type=int, default=8, help='images whose boxes are drawn')
  args = p.parse_args(argv)
  if args.dataset:
    name, split, _ = lost_data.PRESETS[args.dataset]
    args.data, args.split = f'tfds:{name}', split
  return args


class _Features:
  """Patch features ``[N, D]`` of one padded image for one block (one jit per padded size)."""

  def __init__(self, model, kind: str, layer: int):
    self.model, self.kind, self.layer = model, kind, layer
    outputs = ('layers',) if kind == 'tokens' else (kind,)
    self.features = FeaturePass(model, outputs, block=layer)

  def __call__(self, variables, image) -> np.ndarray:
    out = self.features(variables, image[None])
    value = out['layers'][self.layer] if self.kind == 'tokens' else out[self.kind]
    value = np.asarray(value[0], np.float32)
    return value.reshape(value.shape[0], -1)[self.model.num_prefix_tokens:]


def main(argv=None) -> int:
  args = parse_args(argv)
  model, variables = cli.load_model(args)
  source = cli.source(args)
  kind = lost_data.convention(args.data)
  wanted = lost_data.coco20k_filenames() if args.dataset == 'coco20k' else None
  indices = lost_data.selected_indices(source, wanted)
  if args.max_images:
    indices = indices[:args.max_images]
  mean, std = cli.MEANS[args.mean_std]
  native = transforms.EvalNative(patch_size=model.patch_size, mean=mean, std=std,
                                 max_size=args.max_size or None)
  extractors = {layer: _Features(model, args.features, layer) for layer in args.layers}
  settings = list(itertools.product(args.layers, args.bias))
  hits = {s: [] for s in settings}
  per_image, started, drawn = [], time.perf_counter(), 0
  for count, index in enumerate(indices, 1):
    record = dict(source[index])
    record['image'] = decode.decode_image(record['image'])
    x = native.map(record)
    height, width = (int(v) for v in x['size'])
    grid = (x['image'].shape[0] // model.patch_size, x['image'].shape[1] // model.patch_size)
    gt = lost_data.ground_truth(x['boxes'], kind, record.get('box_crowd'))
    for layer in args.layers:
      feats = extractors[layer](variables, x['image'])
      for bias in args.bias:
        result = lost.lost(feats, grid, model.patch_size, (height, width),
                           k_patches=args.k_patches, bias=bias, normalise=args.normalise)
        hit = lost.correct(result.box, gt)
        hits[(layer, bias)].append(hit)
        if (layer, bias) == settings[0]:
          per_image.append({'index': int(index), 'box': result.box, 'gt': gt, 'hit': hit,
                            'seed': result.seed, 'fallback': result.fallback})
          if drawn < args.figures:
            image = figures.denormalise(x['image'][:height, :width], mean, std)
            figures.boxes(os.path.join(args.out, 'boxes', f'{drawn:04d}.png'), image,
                          result.box, gt, title=f'#{index} {"hit" if hit else "miss"}')
            drawn += 1
    if count % 25 == 0 or count == len(indices):
      rate = count / (time.perf_counter() - started)
      sys.stderr.write(f'\r  LOST: {count}/{len(indices)} images, {rate:.1f} img/s, CorLoc '
                       f'{100 * np.mean(hits[settings[0]]):.1f}')
  sys.stderr.write('\n')
  compiles = sum(e.features.compilations for e in extractors.values())
  rows = [{'features': args.features, 'layer': layer, 'bias': bias, 'normalise': args.normalise,
           'CorLoc': 100.0 * float(np.mean(hits[(layer, bias)])), 'images': len(indices)}
          for layer, bias in settings]
  cli.write_json(args.out, 'lost.json', {
      'model': args.model, 'random_init': args.random_init, 'data': args.data,
      'split': args.split, 'box_convention': kind, 'compilations': compiles,
      'settings': rows, 'per_image': per_image})
  table = cli.markdown_table(rows, list(rows[0]))
  cli.write_markdown(args.out, f'LOST CorLoc of {args.model} on {args.data} {args.split}', table)
  print(table)
  return 0


if __name__ == '__main__':
  cli.run_as_script(main)
