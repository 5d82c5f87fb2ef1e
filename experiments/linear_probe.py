"""Linear probe on frozen features, the DINOv2 protocol (REFERENCE §6; paper Table 2).

  python experiments/linear_probe.py --model timm:model.safetensors --data tfds:imagenet2012 \
      --train-split train --split validation --out /tmp/linear
  python experiments/linear_probe.py --model workdir:/tmp/vitreg_smoke --embedded image_size=48 \
      --size 32 --out /tmp/linear_smoke

Features: cls of the last 1 and 4 blocks, each with and without the mean
patch token (registers excluded); a linear classifier per learning rate of
the 13-value grid (1e-5 .. 0.1), SGD momentum 0.9, cosine; the best
(features, lr) on the evaluation split is reported, every cell in
``linear_probe.json`` and ``results.md``.
"""


from vitreg_jax.analysis import cli, probes
from vitreg_jax.analysis.features import FeaturePass


def parse_args(argv):
  p = cli.parser(__doc__.split('\n\n')[0])
  p.add_argument('--train-split', default='train', help='split the classifiers train on')
  p.add_argument('--max-train-images', type=int, default=0, help='0: the whole train split')
  p.add_argument('--epochs', type=int, default=10, help='passes over the train features')
  p.add_argument('--probe-batch', type=int, default=256, help='classifier minibatch')
  p.add_argument('--lrs', type=float, nargs='+', default=list(probes.LR_GRID),
                 help='learning-rate grid, one classifier each (DINOv2: 13 values 1e-5..0.1)')
  p.add_argument('--n-last', type=int, nargs='+', default=[1, 4], help='cls of the last n blocks')
  return p.parse_args(argv)


def extract(model, variables, args, split, max_images):
  mesh, rules = cli.mesh_and_rules()
  features = FeaturePass(model, ('cls_layers', 'patch_mean'), mesh, rules)
  run = cli.copy_args(args, split=split)
  return features.over(variables, cli.batches(run, model, mesh), max_images, progress=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  model, variables = cli.load_model(args)
  train = extract(model, variables, args, args.train_split, args.max_train_images)
  val = extract(model, variables, args, args.split, args.max_images)
  num_classes = int(max(train['label'].max(), val['label'].max())) + 1
  rows = []
  for n_last in args.n_last:
    if n_last > model.depth:
      continue
    for avgpool in (False, True):
      pick = lambda a: probes.dinov2_features(a['cls_layers'], n_last,
                                              a['patch_mean'] if avgpool else None)
      result = probes.linear_probe(pick(train), train['label'], pick(val), val['label'],
                                   num_classes=num_classes, lrs=args.lrs, epochs=args.epochs,
                                   batch_size=args.probe_batch, seed=args.seed)
      rows.append({'n_last': n_last, 'avgpool': avgpool, 'top1': 100 * result['top1'],
                   'best_lr': result['best_lr'],
                   'per_lr': {k: 100 * v for k, v in result['per_lr'].items()}})
  best = max(rows, key=lambda r: r['top1'])
  cli.write_json(args.out, 'linear_probe.json', {
      'model': args.model, 'random_init': args.random_init, 'train_images': len(train['label']),
      'eval_images': len(val['label']), 'num_classes': num_classes, 'best': best, 'grid': rows})
  table = cli.markdown_table(rows, ['n_last', 'avgpool', 'top1', 'best_lr'])
  cli.write_markdown(args.out, f'Linear probe of {args.model}', table)
  print(table)
  print(f'best: {best["top1"]:.2f}% (n_last={best["n_last"]}, avgpool={best["avgpool"]}, '
        f'lr={best["best_lr"]})')
  return 0


if __name__ == '__main__':
  cli.run_as_script(main)
