"""Feature extraction throughput of the analyses' feature pass against timm ``forward_features``.

Same architecture (ViT-S/14 with 4 registers by default, random weights), the
same images (224 px, float32), batches of ``--batch``; ours is
``analysis.features.FeaturePass`` as every analysis runs it (jitted, sharded
over the local devices, results gathered to the host), asked for the tokens
timm returns (cls, registers, patches after the final norm); timm runs under
``torch.inference_mode`` with all cores. Interleaved rounds, median, and the
machine's load average before and after (a loaded machine is flagged: its
numbers are not results; the load after includes the benchmark's own run).

  python experiments/benchmarks/feature_extraction.py [--arch vits14_reg --batch 32 --rounds 7]
"""

import argparse
import os
import time

import numpy as np

import machine


def build_ours(arch, size, batch, images):
  import jax.numpy as jnp
  from vitreg_jax.analysis import cli
  from vitreg_jax.analysis.features import FeaturePass
  from vitreg_jax.models.vit import get_arch

  model = get_arch(arch, img_size=size)
  variables = cli.random_variables(model, 0)
  mesh, rules = cli.mesh_and_rules()
  features = FeaturePass(model, ('cls', 'registers', 'patches'), mesh, rules)
  batches = [{'image': jnp.asarray(images)}]

  def run():
    return features.over(variables, batches)
  run()  # compile
  return run


def build_timm(arch, size, images):
  import timm
  import torch

  torch.set_num_threads(os.cpu_count())
  variant = {'s': 'small', 'b': 'base', 'l': 'large', 'g': 'giant'}[arch[3]]
  name = f'vit_{variant}_patch14_reg4_dinov2' if '_reg' in arch else f'vit_{variant}_patch14_dinov2'
  model = timm.create_model(name, pretrained=False, img_size=size).eval()
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

  def run():
    with torch.inference_mode():
      return model.forward_features(x).numpy()
  run()
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', default='vits14_reg', help='vitreg_jax architecture name')
  parser.add_argument('--size', type=int, default=224, help='image size')
  parser.add_argument('--batch', type=int, default=32, help='images per batch')
  parser.add_argument('--rounds', type=int, default=7, help='interleaved timing rounds')
  machine.add_arguments(parser)
  args = parser.parse_args()
  quiet = machine.Quiet(args)
  images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3),
                                                    dtype=np.float32)
  ours, theirs = build_ours(args.arch, args.size, args.batch, images), build_timm(
      args.arch, args.size, images)
  times = {'ours': [], 'timm': []}
  for _ in range(args.rounds):
    for key, fn in (('ours', ours), ('timm', theirs)):
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  rate = {k: args.batch / np.median(v) for k, v in times.items()}
  print(f'{args.arch} {args.size}x{args.size} batch {args.batch} float32, {args.rounds} '
        f'interleaved rounds, median')
  print(f'feature extraction: vitreg_jax {rate["ours"]:.1f} img/s   timm forward_features '
        f'{rate["timm"]:.1f} img/s   ratio {rate["ours"] / rate["timm"]:.2f}')
  quiet.report()


if __name__ == '__main__':
  main()
