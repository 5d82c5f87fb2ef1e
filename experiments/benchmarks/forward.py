"""ViT forward and forward+backward throughput: vitreg_jax against timm.

Same architecture (ViT-S/14, 4 registers by default), same input size, batch
and dtype (float32), measured interleaved in one process so that machine load
hits both alike; prints the median images/s of each and the ratio.

  python experiments/benchmarks/forward.py [--arch vits14_reg --size 224 --batch 32 --rounds 7]
"""

import argparse
import os
import time

import numpy as np

import machine



def build_jax(arch, size, batch, impl):
  import jax
  import jax.numpy as jnp
  from vitreg_jax.models.vit import get_arch

  model = get_arch(arch, img_size=size, attention_impl=impl)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']

  def loss(p, x):
    out = model.apply({'params': p}, x)
    return out['cls'].sum() + out['patches'].mean()

  forward = jax.jit(lambda p, x: model.apply({'params': p}, x)['patches'])
  train = jax.jit(jax.grad(loss))
  run_fwd = lambda: jax.block_until_ready(forward(params, images))
  run_train = lambda: jax.block_until_ready(train(params, images))
  run_fwd(), run_train()  # compile
  return run_fwd, run_train


def build_timm(arch, size, batch):
  import timm
  import torch

  torch.set_num_threads(os.cpu_count())
  variant = {'s': 'small', 'b': 'base', 'l': 'large', 'g': 'giant'}[arch[3]]
  name = f'vit_{variant}_patch14_reg4_dinov2' if '_reg' in arch else f'vit_{variant}_patch14_dinov2'
  model = timm.create_model(name, pretrained=False, img_size=size).eval()
  images = torch.randn(batch, 3, size, size)

  def run_fwd():
    with torch.inference_mode():
      model.forward_features(images)

  def run_train():
    tokens = model.forward_features(images)
    prefix = model.num_prefix_tokens
    loss = tokens[:, 0].sum() + tokens[:, prefix:].mean()
    model.zero_grad(set_to_none=True)
    loss.backward()

  run_fwd(), run_train()  # warm up
  return run_fwd, run_train


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='vits14_reg')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--attention', default='auto', help='vitreg_jax attention impl')
  machine.add_arguments(parser)
  args = parser.parse_args()
  quiet = machine.Quiet(args)

  import jax
  jax_fwd, jax_train = build_jax(args.arch, args.size, args.batch, args.attention)
  timm_fwd, timm_train = build_timm(args.arch, args.size, args.batch)
  times = {k: [] for k in ('jax_fwd', 'timm_fwd', 'jax_train', 'timm_train')}
  for _ in range(args.rounds):
    for key, fn in (('jax_fwd', jax_fwd), ('timm_fwd', timm_fwd),
                    ('jax_train', jax_train), ('timm_train', timm_train)):
      t0 = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - t0)
  rate = {k: args.batch / np.median(v) for k, v in times.items()}
  print(f'{args.arch} {args.size}x{args.size} batch {args.batch} float32, '
        f'{args.rounds} interleaved rounds, median; jax {jax.__version__} on {jax.default_backend()}')
  for mode in ('fwd', 'train'):
    label = 'forward' if mode == 'fwd' else 'forward+backward'
    ours, ref = rate[f'jax_{mode}'], rate[f'timm_{mode}']
    print(f'{label:17s} vitreg_jax {ours:7.1f} img/s   timm {ref:7.1f} img/s   ratio {ours / ref:.2f}')
  quiet.report()


if __name__ == '__main__':
  main()
