"""The DINOv2 smoke run in PyTorch: is a collapse ours or the recipe's at this scale?

Trains the same model and recipe as ``configs/dinov2_reg.py:<arg>`` with the
independent PyTorch DINOv2 step of ``tests/dinov2_torch.py`` (checked against
our JAX step by ``tests/test_dinov2_step_parity.py``), from our JAX init
weights (``config.seed``), on exactly the batches our loop sees
(``build_train_pipeline(config, seed=config.seed)``). Drop path follows the
reference's training forward: an exact random subset of rows per branch for
any rate > 0. Logs per step the loss terms, the schedules and
``teacher_entropy`` (mean entropy of the teacher's DINO targets, as our
metrics), and the teacher's cls-token kNN top-1 (bank ``eval.train_split``,
queries ``data.eval_split``, as ``vitreg_jax/evals/knn.py``) at step 0
and at the end.

  python experiments/dinov2_torch_reference.py [--config smoke] [--set optim.base_lr=1e-3]
      [--steps 300] [--out metrics.jsonl] [--log_every 25] [--threads 1]
"""

import argparse
import json
import math
import os
import sys
import time

from vitreg_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg: str, overrides):
  config = config_lib.from_file(os.path.join(REPO, 'configs', 'dinov2_reg.py'), arg)
  for item in overrides:
    path, _, value = item.partition('=')
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    current = node[leaf]
    if isinstance(current, bool):
      node[leaf] = value.lower() in ('1', 'true')
    elif isinstance(current, float):
      node[leaf] = float(value)
    elif isinstance(current, int):
      node[leaf] = int(value)
    else:
      node[leaf] = value
  return config


def teacher_features(ref, config, split):
  """Teacher backbone's normed cls tokens of a split, with the eval transform."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from vitreg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  feats, labels = [], []
  with torch.no_grad():
    for batch in pipeline.build_eval_pipeline(config, split=split):
      keep = np.asarray(batch['valid']).astype(bool)
      images = torch.from_numpy(np.array(batch['image'], np.float32)).permute(0, 3, 1, 2)
      feats.append(ref.teacher['backbone'](images)['cls'].numpy()[keep])
      labels.append(np.asarray(batch['label'])[keep])
  return np.concatenate(feats), np.concatenate(labels)


def knn_top1(ref, config) -> dict:
  from vitreg_jax.analysis import knn  # pylint: disable=import-outside-toplevel
  ev = config.eval
  bank, bank_labels = teacher_features(ref, config, ev.train_split)
  queries, query_labels = teacher_features(ref, config, config.data.eval_split)
  num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
  accuracy = knn.knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=num_classes,
                              ks=tuple(ev.knn_ks), temperature=ev.knn_temperature)
  out = {f'knn_top1/k{k}': 100.0 * a for k, a in accuracy.items()}
  out['knn_top1'] = max(out.values())
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='smoke', help='configs/dinov2_reg.py argument string')
  parser.add_argument('--set', action='append', default=[], metavar='PATH=VALUE',
                      help='config override, e.g. optim.base_lr=1e-3 (repeatable)')
  parser.add_argument('--steps', type=int, default=0, help='default: the recipe total')
  parser.add_argument('--out', default='', help='metrics JSONL, one line per step')
  parser.add_argument('--log_every', type=int, default=25)
  parser.add_argument('--threads', type=int, default=1,
                      help='torch intra-op threads; on a loaded machine 2 run ~10x slower than 1')
  args = parser.parse_args()

  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import dinov2_torch  # pylint: disable=import-outside-toplevel
  from vitreg_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from vitreg_jax import recipes  # pylint: disable=import-outside-toplevel
  from vitreg_jax.train.state import unbox  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.threads)
  config = load_config(args.config, args.set)
  recipe = recipes.build(config)
  if config.model.get('dtype', 'float32') != 'float32':
    print(f'note: the torch run is float32 (config dtype {config.model.dtype})')
  steps = args.steps or int(recipe.total_steps)
  torch.manual_seed(config.seed)
  state = jax.jit(lambda r: unbox(recipe.init_state(r)))(jax.random.key(config.seed))
  ref = dinov2_torch.DinoV2Torch(config, recipe.backbone)
  dinov2_torch.load_state(ref.student, jax.device_get(state.params))
  dinov2_torch.load_state(ref.teacher, jax.device_get(state.extras['teacher']))
  del state

  out = open(args.out, 'w', encoding='utf-8') if args.out else None
  initial = knn_top1(ref, config)
  print(json.dumps({'step': 0, **initial}), flush=True)
  data = pipeline.build_train_pipeline(config, recipe.host_batches, seed=config.seed)
  start = time.perf_counter()
  try:
    for step in range(steps):
      batch = next(data)
      metrics = ref.train_step(dinov2_torch.collate(batch), step)
      if not math.isfinite(metrics['loss']):
        raise FloatingPointError(f'non-finite loss at step {step}: {metrics}')
      record = {'step': step + 1, **metrics}
      if out:
        out.write(json.dumps(record) + '\n')
      if (step + 1) % args.log_every == 0 or step == 0:
        rate = (step + 1) / (time.perf_counter() - start)
        print(json.dumps({k: float(f'{v:.5g}') if isinstance(v, float) else v
                          for k, v in record.items()}) + f'  ({rate:.2f} steps/s)', flush=True)
  finally:
    data.close()
  final = knn_top1(ref, config)
  summary = {'step': steps, **final, 'knn_top1_at_init': initial['knn_top1']}
  print(json.dumps(summary), flush=True)
  if out:
    out.write(json.dumps(summary) + '\n')
    out.close()


if __name__ == '__main__':
  main()
