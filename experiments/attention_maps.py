"""Last-block attention of CLS and of each register over the patches (paper Fig. 1, 9).

  python experiments/attention_maps.py --model dinov2:dinov2_vitl14_reg4_pretrain.pth \
      --data folder:my_images --size 518 --out /tmp/attn
  python experiments/attention_maps.py --model workdir:/tmp/vitreg_smoke --embedded image_size=48 \
      --size 32 --max-images 8 --out /tmp/attn_smoke

For each image, ``attention/{i:04d}.png``: the image, the CLS map and each
register's map (mean over heads) overlaid on it; with ``--per-head`` also one
row per head. ``attention_maps.npz`` holds the maps ``[images, 1 + R, heads,
gh, gw]`` of the first ``--save-maps`` images; ``attention.json`` the
entropy of each map (a peaked map has low entropy) and ``results.md`` the
summary. Only one batch of attention is ever on the host.
"""

import os

import numpy as np

from vitreg_jax.analysis import attention_maps, cli, figures
from vitreg_jax.analysis.features import FeaturePass


def parse_args(argv):
  p = cli.parser(__doc__.split('\n\n')[0])
  p.add_argument('--per-head', action='store_true', help='also draw every head')
  p.add_argument('--figures', type=int, default=16, help='images to draw (0: none)')
  p.add_argument('--save-maps', type=int, default=64, help='images whose maps go in the .npz')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  model, variables = cli.load_model(args)
  mesh, rules = cli.mesh_and_rules()
  grid = (args.size // model.patch_size,) * 2
  names = attention_maps.token_names(model)
  mean, std = cli.MEANS[args.mean_std]
  features = FeaturePass(model, ('prefix_attention',), mesh, rules)
  drawn, saved, entropies = 0, [], []
  batches = cli.batches(args, model, mesh)
  for host in features.stream(variables, batches, args.max_images, progress=True,
                              keep=('label', 'image')):
    maps = attention_maps.maps(host['prefix_attention'], grid)  # [B, P, H, gh, gw]
    entropies.append(attention_maps.entropy(maps))
    if len(saved) < args.save_maps:
      saved.extend(maps[:args.save_maps - len(saved)])
    for image, m in zip(host['image'], maps):
      if drawn >= args.figures:
        break
      shown = figures.denormalise(image, mean, std)
      overlays = {f'{n} (mean)': m[i].mean(0) for i, n in enumerate(names)}
      if args.per_head:
        overlays.update({f'{n} h{h}': m[i, h] for h in range(m.shape[1])
                         for i, n in enumerate(names)})
      figures.overlay_grid(os.path.join(args.out, 'attention', f'{drawn:04d}.png'), shown,
                           overlays, title=args.model, columns=len(names))
      drawn += 1
  entropy = np.concatenate(entropies)  # [N, P, H]
  np.savez_compressed(os.path.join(args.out, 'attention_maps.npz'), maps=np.asarray(saved),
                      tokens=np.asarray(names))
  rows = [{'token': n, 'entropy (nats, mean over heads)': float(entropy[:, i].mean()),
           'uniform': float(np.log(grid[0] * grid[1]))} for i, n in enumerate(names)]
  cli.write_json(args.out, 'attention.json', {'model': args.model, 'grid': grid,
                                              'images': len(entropy), 'maps': rows})
  table = cli.markdown_table(rows, list(rows[0]))
  cli.write_markdown(args.out, 'Attention maps of CLS and registers', table)
  print(table)
  return 0


if __name__ == '__main__':
  cli.run_as_script(main)
