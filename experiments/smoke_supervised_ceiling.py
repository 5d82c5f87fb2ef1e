"""How far the smoke backbone gets *with labels* in the quickstart's step budget.

A calibration for the DINOv2 quickstart: the same ViT (the smoke preset's
backbone, same size, registers, LayerScale, drop path) trained supervised
on the embedded train split (the ``supervised`` recipe: linear head on the
normed cls token, AdamW with warmup + cosine, horizontal flips), scored with
the same kNN protocol on the same val split (cls features, k = 20, T = 0.07)
every ``--every`` steps. A self-supervised run of the same backbone for the
same number of steps is not expected to beat these numbers.

  python experiments/smoke_supervised_ceiling.py --steps 750 --every 250
  python experiments/smoke_supervised_ceiling.py --set model.depth=2 --set model.num_heads=6
"""

import argparse
import importlib.util
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def supervised_config(dinov2, steps: int, lr: float, batch: int):
  """The supervised recipe around the DINOv2 smoke backbone."""
  config = load('supervised', 'smoke')
  crop = int(dinov2.augment.eval_crop_size)
  config.model = dinov2.model.copy_and_resolve_references()
  config.model.img_size = crop
  config.num_classes = int(dinov2.data.embedded.num_classes)
  config.input.update(global_batch_size=batch, image_size=crop)
  config.total_steps = steps
  config.optimizer.update(lr=lr, warmup_steps=min(100, steps // 5))
  return config


def split_arrays(dinov2, split: str):
  """The split through the kNN evaluation's own transform (resize + centre crop)."""
  from vitreg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  images, labels = [], []
  for batch in pipeline.build_eval_pipeline(dinov2, split=split, process_index=0, process_count=1):
    keep = np.asarray(batch['valid']).astype(bool)
    images.append(np.asarray(batch['image'])[keep])
    labels.append(np.asarray(batch['label'])[keep])
  return np.concatenate(images), np.concatenate(labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=750)
  parser.add_argument('--every', type=int, default=250)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--set', action='append', default=[],
                      help='PATH=VALUE on the DINOv2 smoke config, e.g. model.depth=2')
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from vitreg_jax.analysis import knn  # pylint: disable=import-outside-toplevel
  from vitreg_jax.train import sharded as sharded_lib  # pylint: disable=import-outside-toplevel

  dinov2 = load('dinov2_reg', 'smoke')
  for item in args.set:
    path, _, value = item.partition('=')
    *parents, leaf = path.split('.')
    node = dinov2
    for parent in parents:
      node = node[parent]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else float(value)
  batch_size = int(dinov2.data.batch_size)
  config = supervised_config(dinov2, args.steps, args.lr, batch_size)
  trainer = sharded_lib.from_config(config, devices=jax.devices()[:1])
  train_x, train_y = split_arrays(dinov2, dinov2.eval.train_split)
  val_x, val_y = split_arrays(dinov2, dinov2.data.eval_split)
  embed = jax.jit(lambda params, x: trainer.recipe.model.backbone.apply(
      {'params': params['backbone']}, x)['cls'])

  def knn_top1(params) -> float:
    bank = np.concatenate([embed(params, train_x[i:i + 256]) for i in range(0, len(train_x), 256)])
    accuracy = knn.knn_accuracy(bank, train_y, np.asarray(embed(params, val_x)), val_y,
                                num_classes=config.num_classes, ks=(20,), temperature=0.07)
    return 100 * accuracy[20]

  rng = np.random.default_rng(0)
  state = trainer.init(jax.random.key(0))
  key = jax.random.key(1)
  print(f'supervised smoke backbone ({dinov2.model.depth} blocks x {dinov2.model.embed_dim}, '
        f'{dinov2.model.num_heads} heads), batch {batch_size}, lr {args.lr}')
  print(f'step 0: kNN top-1 {knn_top1(state.params):.1f}%')
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    rows = rng.integers(0, len(train_x), batch_size)
    images = train_x[rows]
    flip = rng.random(batch_size) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    batch = trainer.global_batch({'images': images, 'labels': train_y[rows].astype(np.int32)},
                                 batch_size)
    state, metrics = trainer.train_step(state, batch, key)
    if step % args.every == 0 or step == args.steps:
      print(f'step {step}: train loss {float(metrics["loss"]):.3f}, kNN top-1 '
            f'{knn_top1(state.params):.1f}% ({time.perf_counter() - start:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
