"""Where a ViT block's time goes on this CPU: each op, forward and forward+backward, vs PyTorch.

One transformer block of ViT-S/14 reg4 at 224² (batch 32: 261 tokens, width
384, 6 heads, MLP 1536), op by op at the block's real shapes: LayerNorm, qkv
/ proj / fc1 / fc2 dense layers, the attention core (each of our
implementations against torch's fused ``scaled_dot_product_attention``), exact
GELU, LayerScale + residual; then the whole block (ours, attention ``auto``,
against timm's ``Block``). JAX ops are jitted one by one; torch runs eagerly
as timm does. Forward+backward = gradients w.r.t. inputs and params of
``sum(out ** 2 * cotangent)`` (squared so the forward is needed: XLA would
skip a linear op's forward under a linear loss). Interleaved rounds, medians; the load before and
after is printed (see ``machine.py``).

  python experiments/benchmarks/block_profile.py [--rounds 5 --batch 32]
"""

import argparse
import os
import time

import numpy as np

import machine

T, D, H, HIDDEN = 261, 384, 6, 1536


def jax_ops(batch):
  import jax
  import jax.numpy as jnp
  from vitreg_jax.models import attention, layers

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, T, D), np.float32))
  hidden = jnp.asarray(rng.standard_normal((batch, T, HIDDEN), np.float32))
  qkv = [jnp.asarray(rng.standard_normal((batch, T, H, D // H), np.float32)) for _ in range(3)]

  def dense(n_in, n_out):
    w = jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) * 0.02)
    b = jnp.zeros((n_out,), jnp.float32)
    return (lambda p, a: a @ p[0] + p[1]), (w, b)

  def layer_norm(p, a):
    mean = a.mean(-1, keepdims=True)
    var = ((a - mean) ** 2).mean(-1, keepdims=True)
    return (a - mean) * jax.lax.rsqrt(var + 1e-6) * p[0] + p[1]

  ops = {
      'layernorm': (layer_norm, (jnp.ones(D), jnp.zeros(D)), x),
      'qkv dense': (*dense(D, 3 * D), x),
      'proj dense': (*dense(D, D), x),
      'fc1 dense': (*dense(D, HIDDEN), x),
      'gelu (exact)': (lambda p, a: layers.ACTIVATIONS['gelu'](a), (), hidden),
      'fc2 dense': (*dense(HIDDEN, D), hidden),
      'layerscale + residual': (lambda p, a: a + p[0] * a, (jnp.full(D, 1e-5),), x),
  }
  for impl in attention.IMPLS[1:]:
    ops[f'attention core ({impl})'] = (
        lambda p, a, impl=impl: attention.dot_product_attention(*a, impl=impl)[0], (), qkv)

  def timed(fn, params, inputs):
    out = jax.eval_shape(fn, params, inputs)
    cotangent = jnp.asarray(rng.standard_normal(out.shape, np.float32))
    forward = jax.jit(fn)
    grads = jax.jit(jax.grad(lambda p, a: (fn(p, a) ** 2 * cotangent).sum(), argnums=(0, 1)))
    return (lambda: jax.block_until_ready(forward(params, inputs)),
            lambda: jax.block_until_ready(grads(params, inputs)))

  result = {name: timed(*op) for name, op in ops.items()}
  from vitreg_jax.models.layers import Block
  block = Block(num_heads=H, mlp_hidden_dim=HIDDEN, layerscale_init=1e-5, norm_eps=1e-6)
  params = jax.jit(block.init)(jax.random.key(0), x[:1])
  result['whole block (ours, auto)'] = timed(lambda p, a: block.apply(p, a)[0], params, x)
  return result


def torch_ops(batch):
  import timm.models.vision_transformer as tvit
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(os.cpu_count())
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch, T, D, generator=gen)
  hidden = torch.randn(batch, T, HIDDEN, generator=gen)
  qkv = [torch.randn(batch, H, T, D // H, generator=gen) for _ in range(3)]
  modules = {
      'layernorm': (torch.nn.LayerNorm(D, eps=1e-6), x),
      'qkv dense': (torch.nn.Linear(D, 3 * D), x),
      'proj dense': (torch.nn.Linear(D, D), x),
      'fc1 dense': (torch.nn.Linear(D, HIDDEN), x),
      'gelu (exact)': (torch.nn.GELU(), hidden),
      'fc2 dense': (torch.nn.Linear(HIDDEN, D), hidden),
      'layerscale + residual': (tvit.LayerScale(D, init_values=1e-5), x),
      'attention core': (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), qkv),
      'whole block (timm)': (tvit.Block(D, H, qkv_bias=True, init_values=1e-5,
                                        norm_layer=lambda d, **kw: torch.nn.LayerNorm(d, eps=1e-6, **kw)), x),
  }

  def timed(module, inputs):
    inputs = inputs if isinstance(inputs, list) else [inputs]
    call = (lambda *a: a[0] + module(*a)) if isinstance(module, tvit.LayerScale) else module

    def forward():
      with torch.inference_mode():
        call(*inputs)

    leaves = [t.clone().requires_grad_() for t in inputs]
    out = call(*leaves)
    cotangent = torch.randn(out.shape, generator=gen)

    def backward():
      for leaf in leaves:
        leaf.grad = None
      if isinstance(module, torch.nn.Module):
        module.zero_grad(set_to_none=True)
      (call(*leaves) ** 2 * cotangent).sum().backward()
    return forward, backward
  return {name: timed(*m) for name, m in modules.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  machine.add_arguments(parser)
  args = parser.parse_args()
  quiet = machine.Quiet(args)
  ours, theirs = jax_ops(args.batch), torch_ops(args.batch)
  runs = {('jax', k): v for k, v in ours.items()} | {('torch', k): v for k, v in theirs.items()}
  for fns in runs.values():  # compile / warm up
    fns[0](), fns[1]()
  times = {key: ([], []) for key in runs}
  for _ in range(args.rounds):
    for key, fns in runs.items():
      for mode in (0, 1):
        start = time.perf_counter()
        fns[mode]()
        times[key][mode].append(time.perf_counter() - start)
  ms = {key: [1e3 * float(np.median(t)) for t in pair] for key, pair in times.items()}
  print(f'one ViT-S/14 reg4 block, batch {args.batch} x {T} tokens, float32, {args.rounds} '
        f'interleaved rounds, median ms')
  print('| op | ours fwd | torch fwd | ours fwd+bwd | torch fwd+bwd | ratio fwd | ratio fwd+bwd |')
  print('|---|---|---|---|---|---|---|')
  for name in ours:
    ref = 'attention core' if name.startswith('attention core') else (
        'whole block (timm)' if name.startswith('whole block') else name)
    (f, b), (tf, tb) = ms[('jax', name)], ms[('torch', ref)]
    print(f'| {name} | {f:.1f} | {tf:.1f} | {b:.1f} | {tb:.1f} | {tf / f:.2f} | {tb / b:.2f} |')
  quiet.report()


if __name__ == '__main__':
  main()
