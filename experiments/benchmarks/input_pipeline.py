"""DINOv2 multi-crop input pipeline: throughput against torchvision, and against the train step.

1. Per worker (one process, one thread): decode + 2x224 + 8x96 multi-crop of the
   same JPEGs with vitreg_jax (PIL geometry + planar numpy colour ops) and with
   a torchvision implementation of the DINOv2 augmentation (REFERENCE §3, on PIL
   images as upstream does), interleaved round by round so machine load hits
   both alike; prints the median images/s of each and the ratio (goal >= 1.5).
2. The whole grain pipeline (image folder -> decode -> multi-crop -> batch ->
   iBOT masks) with ``--workers`` worker processes, images/s after start-up.
3. A DINOv2 ViT-S/14 step proxy on this machine: student forward+backward on
   all crops (iBOT masks on the global crops) + teacher forward on the global
   crops, without heads, losses or optimizer (a lower bound on the real step),
   and its FLOPs per image; then whether the pipeline keeps up.

  python experiments/benchmarks/input_pipeline.py [--images 48 --rounds 5 --workers 2 --step_batch 4]
"""

import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np

import machine
from PIL import Image

IMAGE_SIZE = (500, 375)  # a typical ImageNet training image


def make_jpegs(count):
  """ImageNet-sized JPEGs of the embedded dataset's scenes (quality 90)."""
  from vitreg_jax.data import embedded
  config = embedded.EmbeddedConfig(image_size=256)
  jpegs = []
  for i in range(count):
    image = Image.fromarray(embedded.render(config, 'train', i)['image']).resize(IMAGE_SIZE, Image.BICUBIC)
    noise = np.random.default_rng(i).normal(0, 6, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3))
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    jpegs.append(buffer.getvalue())
  return jpegs


def torchvision_dinov2():
  """DINOv2's DataAugmentationDINO in torchvision, with the as-trained blur probabilities."""
  from torchvision import transforms as T
  bicubic = T.InterpolationMode.BICUBIC
  blur = lambda p: T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)
  geometric_global = T.Compose([T.RandomResizedCrop(224, scale=(0.32, 1.0), interpolation=bicubic),
                                T.RandomHorizontalFlip(0.5)])
  geometric_local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.32), interpolation=bicubic),
                               T.RandomHorizontalFlip(0.5)])
  colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)])
  normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  global_1 = T.Compose([colour, blur(0.0), normalize])
  global_2 = T.Compose([colour, blur(0.9), T.RandomSolarize(128, p=0.2), normalize])
  local = T.Compose([colour, blur(0.5), normalize])

  def augment(jpeg):
    image = Image.open(io.BytesIO(jpeg)).convert('RGB')
    return ([global_1(geometric_global(image)), global_2(geometric_global(image))]
            + [local(geometric_local(image)) for _ in range(8)])
  return augment


def ours_dinov2(photometric=True):
  """Our multi-crop; without photometric ops it measures what moving them on-device would save."""
  from vitreg_jax.data import decode
  from vitreg_jax.data import transforms
  off = {} if photometric else dict(color_jitter_prob=0.0, grayscale_prob=0.0,
                                      blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0)
  multicrop = transforms.DinoMultiCrop(**off)
  rng = np.random.default_rng(0)
  return lambda jpeg: multicrop.random_map({'image': decode.decode_image(jpeg)}, rng)


def per_worker_rates(jpegs, rounds):
  import torch
  torch.set_num_threads(1)
  implementations = {'vitreg_jax': ours_dinov2(), 'torchvision': torchvision_dinov2(),
                     'geometry_only': ours_dinov2(photometric=False)}
  for augment in implementations.values():  # warm up
    for jpeg in jpegs[:3]:
      augment(jpeg)
  rates = {name: [] for name in implementations}
  for _ in range(rounds):
    for name, augment in implementations.items():
      start = time.perf_counter()
      for jpeg in jpegs:
        augment(jpeg)
      rates[name].append(len(jpegs) / (time.perf_counter() - start))
  return {name: statistics.median(r) for name, r in rates.items()}


def pipeline_rate(jpegs, workers, batches):
  import ml_collections
  from vitreg_jax.data import multicrop, pipeline
  with tempfile.TemporaryDirectory() as root:
    os.makedirs(os.path.join(root, 'class0'))
    for i, jpeg in enumerate(jpegs):
      with open(os.path.join(root, 'class0', f'{i}.jpg'), 'wb') as f:
        f.write(jpeg)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = dict(source='folder', path=root, batch_size=16, num_workers=workers, worker_buffer_size=2)
    config.masking = dict(patch_size=14)
    iterator = pipeline.build_train_pipeline(config, multicrop.MultiCropBatches(config),
                                             process_index=0, process_count=1)
    for _ in range(max(2, workers)):  # start-up: spawn workers, first batches
      next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    rate = batches * 16 / (time.perf_counter() - start)
    iterator.close()
  return rate


def step_proxy(batch):
  """ViT-S/14 (4 registers) DINOv2-shaped step without heads: images/s and GFLOPs/image."""
  import jax
  import jax.numpy as jnp
  from vitreg_jax.models.vit import get_arch
  model = get_arch('vits14_reg', img_size=224)
  rng = np.random.default_rng(0)
  global_crops = jnp.asarray(rng.standard_normal((2 * batch, 224, 224, 3), np.float32))
  local_crops = jnp.asarray(rng.standard_normal((8 * batch, 98, 98, 3), np.float32))  # 98 for patch 14
  masks = jnp.asarray(rng.random((2 * batch, 256)) < 0.25)
  params = jax.jit(model.init)(jax.random.key(0), global_crops[:1])['params']

  def student_loss(p):
    g = model.apply({'params': p}, global_crops, masks=masks, train=False)
    l = model.apply({'params': p}, local_crops, train=False)
    return g['cls'].sum() + g['patches'].mean() + l['cls'].sum()

  def step(student, teacher):
    t = model.apply({'params': teacher}, global_crops)
    grads = jax.grad(student_loss)(student)
    return grads, t['cls'].sum() + t['patches'].mean()

  compiled = jax.jit(step).lower(params, params).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  jax.block_until_ready(compiled(params, params))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, params))
    times.append(time.perf_counter() - start)
  return batch / statistics.median(times), flops / batch / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=48)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--pipeline_batches', type=int, default=8)
  parser.add_argument('--step_batch', type=int, default=4)
  machine.add_arguments(parser)
  args = parser.parse_args()
  quiet = machine.Quiet(args)

  jpegs = make_jpegs(args.images)
  print(f'{len(jpegs)} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}; DINOv2 multi-crop 2x224 + 8x96; '
        f'{os.cpu_count()} CPUs')
  rates = per_worker_rates(jpegs, args.rounds)
  ratio = rates['vitreg_jax'] / rates['torchvision']
  print(f'per worker: vitreg_jax {rates["vitreg_jax"]:.1f} img/s, torchvision '
        f'{rates["torchvision"]:.1f} img/s, ratio {ratio:.2f} (goal >= 1.5)')
  print(f'  decode + crops + resize + normalise only (photometric ops on device instead): '
        f'{rates["geometry_only"]:.1f} img/s, x{rates["geometry_only"] / rates["vitreg_jax"]:.2f}')

  full = pipeline_rate(jpegs, args.workers, args.pipeline_batches)
  print(f'grain pipeline, {args.workers} workers: {full:.1f} img/s '
        f'({full / max(args.workers, 1):.1f} per worker; decode + crops + batch + masks + IPC)')

  step_rate, gflops = step_proxy(args.step_batch)
  print(f'ViT-S/14 step proxy on this machine (batch {args.step_batch}, all cores): '
        f'{step_rate:.2f} img/s, {gflops:.1f} GFLOP/image')
  verdict = 'keeps up' if full >= step_rate else 'does NOT keep up'
  print(f'pipeline {full:.1f} img/s vs step {step_rate:.2f} img/s: the input pipeline {verdict} '
        f'(it needs {step_rate / full:.0%} of the workers\' time)')
  for name, tflops in (('an accelerator at 100 TFLOP/s effective', 100.0),):
    demand = tflops * 1e3 / gflops
    print(f'for {name}: {demand:.0f} img/s per chip = '
          f'{demand / rates["vitreg_jax"]:.0f} host cores at the per-worker rate above')
  quiet.report()


if __name__ == '__main__':  # spawn-safe: grain workers re-import this module
  main()
