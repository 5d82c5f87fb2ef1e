"""What one token knows: position, pixels and class from a normal vs an outlier token vs CLS
(paper Table 1, Fig. 5b).

  python experiments/token_probes.py --model dinov2:dinov2_vitg14_pretrain.pth \
      --data tfds:imagenet2012 --train-split train --split validation --max-train-images 10000 \
      --cutoff 150 --out /tmp/tokens
  python experiments/token_probes.py --model workdir:/tmp/vitreg_smoke --embedded image_size=48 \
      --size 32 --out /tmp/tokens_smoke

Output patch tokens (after the final norm) are split into outliers (norm
before the final norm above ``--cutoff``, by default the valley of the
distribution) and normal ones. Linear probes, trained on the train split's
tokens and evaluated on the evaluation split's, separately per kind:

* position: a classifier token -> its grid index (top-1, mean distance in patches);
* pixels: ridge regression token -> its patch's (normalised) pixels, mean squared error;
* class: the image label from one token per image: CLS, a random normal
  token, the highest-norm token when it is an outlier (images without one
  are left out of that row).

Writes ``token_probes.json`` and ``results.md``. A model without outliers
(registers) gives no outlier rows.
"""


import numpy as np

from vitreg_jax.analysis import artifacts, cli, probes
from vitreg_jax.analysis.features import FeaturePass


def parse_args(argv):
  p = cli.parser(__doc__.split('\n\n')[0])
  p.add_argument('--train-split', default='train', help='split the probes train on')
  p.add_argument('--max-train-images', type=int, default=0, help='0: the whole train split')
  p.add_argument('--tokens-per-image', type=int, default=8,
                 help='random patch tokens kept per image (plus its highest-norm one)')
  p.add_argument('--cutoff', type=float, default=None,
                 help='outlier norm before the final norm (default: the valley)')
  p.add_argument('--epochs', type=int, default=20, help='of the linear classifiers')
  return p.parse_args(argv)


def patchify(images, patch: int) -> np.ndarray:
  """``[B, H, W, C]`` -> ``[B, N, patch * patch * C]`` in raster order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), -1)


def collect(model, variables, args, split, limit, rng) -> dict:
  """Sampled tokens with their norm, position and pixels; every image's cls and label."""
  mesh, rules = cli.mesh_and_rules()
  features = FeaturePass(model, ('cls', 'patches', 'prenorm_norms'), mesh, rules)
  run = cli.copy_args(args, split=split)
  prefix = model.num_prefix_tokens
  out = {k: [] for k in ('token', 'norm', 'position', 'pixels', 'image', 'cls', 'label',
                         'all_norms', 'max_token', 'max_norm')}
  seen = 0
  for host in features.stream(variables, cli.batches(run, model, mesh), limit, progress=True,
                              keep=('label', 'image')):
    norms = host['prenorm_norms'][:, prefix:]
    pixels = patchify(host['image'], model.patch_size)
    b, n = norms.shape
    k = min(args.tokens_per_image, n)
    picks = np.stack([rng.choice(n, k, replace=False) for _ in range(b)])
    rows = np.arange(b)[:, None]
    out['token'].append(host['patches'][rows, picks].reshape(b * k, -1))
    out['norm'].append(norms[rows, picks].ravel())
    out['position'].append(picks.ravel())
    out['pixels'].append(pixels[rows, picks].reshape(b * k, -1))
    out['image'].append(np.repeat(np.arange(seen, seen + b), k))
    top = norms.argmax(axis=1)
    out['max_token'].append(host['patches'][np.arange(b), top])
    out['max_norm'].append(norms[np.arange(b), top])
    out['cls'].append(host['cls'])
    out['label'].append(host['label'])
    out['all_norms'].append(norms)
    seen += b
  return {name: np.concatenate(v) for name, v in out.items()}


def _position_rows(train, val, cutoff, grid, args):
  n = grid[0] * grid[1]
  rows = []
  for kind, pick in (('normal', lambda d: d['norm'] <= cutoff),
                     ('outlier', lambda d: d['norm'] > cutoff)):
    keep = pick(val)
    if not keep.any():
      continue
    result = probes.linear_probe(train['token'], train['position'], val['token'][keep],
                                 val['position'][keep], num_classes=n, epochs=args.epochs,
                                 seed=args.seed)
    predicted = result['predictions']
    true = val['position'][keep]
    (pr, pc), (tr, tc) = divmod(predicted, grid[1]), divmod(true, grid[1])
    distance = np.hypot(pr - tr, pc - tc)
    rows.append({'probe': 'position', 'token': kind, 'tokens': int(keep.sum()),
                 'top1 %': 100 * float((predicted == true).mean()),
                 'mean distance': float(distance.mean())})
  return rows


def main(argv=None) -> int:
  args = parse_args(argv)
  model, variables = cli.load_model(args)
  rng = np.random.default_rng(args.seed)
  train = collect(model, variables, args, args.train_split, args.max_train_images, rng)
  val = collect(model, variables, args, args.split, args.max_images, rng)
  cutoff = args.cutoff if args.cutoff is not None else artifacts.valley_cutoff(
      np.concatenate([train['all_norms'], val['all_norms']]))
  cut = np.inf if cutoff is None else cutoff
  grid = (args.size // model.patch_size,) * 2
  rows = _position_rows(train, val, cut, grid, args)
  w, b = probes.ridge_regression(train['token'], train['pixels'])
  error = ((val['token'] @ w + b - val['pixels']) ** 2).mean(axis=1)
  for kind, keep in (('normal', val['norm'] <= cut), ('outlier', val['norm'] > cut)):
    if keep.any():
      rows.append({'probe': 'pixels', 'token': kind, 'tokens': int(keep.sum()),
                   'mse': float(error[keep].mean())})
  num_classes = int(max(train['label'].max(), val['label'].max())) + 1
  normal_train, normal_val = _one_normal(train, cut, rng), _one_normal(val, cut, rng)
  for kind, (tx, ty), (vx, vy) in (
      ('cls', (train['cls'], train['label']), (val['cls'], val['label'])),
      ('normal', normal_train, normal_val),
      ('outlier', _one_outlier(train, cut), _one_outlier(val, cut))):
    if len(vx) and len(tx):
      result = probes.linear_probe(tx, ty, vx, vy, num_classes=num_classes, epochs=args.epochs,
                                   seed=args.seed)
      rows.append({'probe': 'class', 'token': kind, 'tokens': len(vx),
                   'top1 %': 100 * result['top1']})
  cli.write_json(args.out, 'token_probes.json', {
      'model': args.model, 'random_init': args.random_init, 'cutoff': cutoff,
      'outlier_fraction_val': float((val['all_norms'] > cut).mean()), 'rows': rows})
  table = cli.markdown_table(rows, ['probe', 'token', 'tokens', 'top1 %', 'mean distance', 'mse'])
  cli.write_markdown(args.out, f'Single-token probes of {args.model} (cutoff {cutoff})', table)
  print(table)
  return 0


def _one_normal(data, cut, rng):
  """One random sampled normal token per image (images with none left out)."""
  tokens, labels = [], []
  for image in np.unique(data['image']):
    candidates = np.flatnonzero((data['image'] == image) & (data['norm'] <= cut))
    if len(candidates):
      tokens.append(data['token'][rng.choice(candidates)])
      labels.append(data['label'][image])
  return np.asarray(tokens).reshape(len(tokens), -1), np.asarray(labels, np.int32)


def _one_outlier(data, cut):
  keep = data['max_norm'] > cut
  return data['max_token'][keep], data['label'][keep]


if __name__ == '__main__':
  cli.run_as_script(main)
