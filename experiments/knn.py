"""Weighted kNN on frozen cls features, the DINO/DINOv2 protocol (REFERENCE §6).

  python experiments/knn.py --model dinov2:dinov2_vits14_reg4_pretrain.pth \
      --data tfds:imagenet2012 --train-split train --split validation --out /tmp/knn
  python experiments/knn.py --model workdir:/tmp/vitreg_smoke --embedded image_size=48 \
      --embedded num_classes=6 --size 32 --out /tmp/knn_smoke

L2-normalised normed cls, cosine similarity, the k nearest of the train
split vote with weight exp(sim / T). Writes ``knn.json`` and ``results.md``.
"""


from vitreg_jax.analysis import cli, knn
from vitreg_jax.analysis.features import FeaturePass


def parse_args(argv):
  p = cli.parser(__doc__.split('\n\n')[0])
  p.add_argument('--train-split', default='train', help='the bank of labelled neighbours')
  p.add_argument('--max-train-images', type=int, default=0, help='0: the whole train split')
  p.add_argument('--ks', type=int, nargs='+', default=[10, 20, 100, 200],
                 help='numbers of neighbours voting')
  p.add_argument('--temperature', type=float, default=0.07,
                 help='vote weight exp(cosine / T)')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  model, variables = cli.load_model(args)
  mesh, rules = cli.mesh_and_rules()
  features = FeaturePass(model, ('cls',), mesh, rules)
  def over(split, limit):
    run = cli.copy_args(args, split=split)
    return features.over(variables, cli.batches(run, model, mesh), limit, progress=True)
  bank = over(args.train_split, args.max_train_images)
  queries = over(args.split, args.max_images)
  num_classes = int(max(bank['label'].max(), queries['label'].max())) + 1
  accuracy = knn.knn_accuracy(bank['cls'], bank['label'], queries['cls'], queries['label'],
                              num_classes=num_classes, ks=tuple(args.ks),
                              temperature=args.temperature)
  rows = [{'k': k, 'top1': 100 * a} for k, a in accuracy.items()]
  cli.write_json(args.out, 'knn.json', {
      'model': args.model, 'random_init': args.random_init, 'train_images': len(bank['label']),
      'eval_images': len(queries['label']), 'num_classes': num_classes,
      'temperature': args.temperature, 'top1': rows})
  table = cli.markdown_table(rows, ['k', 'top1'])
  cli.write_markdown(args.out, f'kNN of {args.model}', table)
  print(table)
  return 0


if __name__ == '__main__':
  cli.run_as_script(main)
