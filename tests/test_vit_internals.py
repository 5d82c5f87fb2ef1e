"""ViT internals sown into 'intermediates' (patch embedding, per-block q/k/v), and the
attention implementations agreeing with each other (outputs, probabilities, gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax.convert import params as params_lib
from vitreg_jax.models import attention as attention_lib
from vitreg_jax.models.vit import VisionTransformer, block_intermediates

TOL = 1e-5
DIM, HEADS, DEPTH, PATCH = 32, 4, 3, 8
HD = DIM // HEADS


def tiny_model(**overrides) -> VisionTransformer:
  kwargs = dict(patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_registers=2,
                img_size=32, layerscale_init=0.5)
  kwargs.update(overrides)
  return VisionTransformer(**kwargs)


def random_images(batch: int, height: int = 32, width: int = 40, seed: int = 0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, height, width, 3)),
                     jnp.float32)


@functools.lru_cache(maxsize=None)
def tiny_variables(seed: int = 0) -> dict:
  """Unrolled, unboxed params with every weight random (O(1) activations)."""
  model = tiny_model()
  rng = np.random.default_rng(seed)
  flat = {}
  for name, spec in params_lib.expected_shapes(model).items():
    n = rng.standard_normal(spec.shape).astype(np.float32)
    leaf = name.rsplit('/', 1)[-1]
    flat[name] = (1 + 0.1 * n if leaf == 'scale' else 0.5 + 0.2 * n if leaf == 'gamma'
                  else 0.5 * n if leaf.endswith(('_token', '_tokens'))
                  else 0.2 * n if leaf == 'pos_embed' else 0.1 * n)
  return params_lib.to_variables(flat, scan_blocks=False)


def sown(model, variables, images, **kwargs):
  out, state = model.apply(variables, images, mutable=['intermediates'], **kwargs)
  return out, state['intermediates']


def softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_sown_qkv_reproduce_the_returned_attention():
  model, variables = tiny_model(), tiny_variables()
  images = random_images(2)
  out, inter = sown(model, variables, images, return_attention=True, return_layers=True)
  q, k, v = (np.asarray(block_intermediates(inter, n), np.float64) for n in 'qkv')
  tokens = 1 + model.num_registers + (32 // PATCH) * (40 // PATCH)
  for x in (q, k, v):
    assert x.shape == (DEPTH, 2, tokens, HEADS, HD)
  assert inter['blocks_0']['attn']['q'][0].shape == (2, tokens, HEADS, HD)
  probs = softmax(np.einsum('lbqhd,lbkhd->lbhqk', q, k) / np.sqrt(HD))
  np.testing.assert_allclose(probs, out['attention'], atol=TOL, rtol=0)
  assert np.abs(probs[-1] - np.asarray(out['attention'][-1])).max() <= TOL  # the last block's

  # The q/k/v themselves: block 1's input is block 0's output, through norm1 and qkv.
  p = variables['params']['blocks_1']
  h = layer_norm(np.asarray(out['layers'][0], np.float64), p['norm1']['scale'], p['norm1']['bias'])
  qkv = np.einsum('btd,dshe->btshe', h, p['attn']['qkv']['kernel']) + p['attn']['qkv']['bias']
  for s, x in enumerate((q, k, v)):
    np.testing.assert_allclose(x[1], qkv[:, :, s], atol=TOL, rtol=0)

  # Sowing changes nothing in the outputs, and without `mutable` nothing is sown.
  plain = model.apply(variables, images, return_attention=True, return_layers=True)
  assert isinstance(plain, dict) and set(plain) == set(out)
  jax.tree.map(np.testing.assert_array_equal, plain, out)
  assert set(model.init(jax.random.key(0), images)) == {'params'}


def test_patch_embed_out_is_patchify_times_kernel_plus_bias():
  model, variables = tiny_model(), tiny_variables()
  images = random_images(3, seed=1)
  masks = jnp.asarray(np.random.default_rng(2).random((3, 20)) < 0.5)
  _, inter = sown(model, variables, images, masks=masks)  # before the mask tokens too
  got = inter['patch_embed_out']
  assert isinstance(got, tuple) and len(got) == 1 and got[0].shape == (3, 20, DIM)
  p = variables['params']['patch_embed']['proj']
  x = np.asarray(images, np.float64).reshape(3, 4, PATCH, 5, PATCH, 3)
  patches = x.transpose(0, 1, 3, 2, 4, 5).reshape(3, 20, PATCH * PATCH * 3)  # row-major grid
  want = patches @ np.asarray(p['kernel'], np.float64).reshape(-1, DIM) + p['bias']
  np.testing.assert_allclose(got[0], want, atol=TOL, rtol=0)


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_blocks_sow_the_same_stacked_values(remat):
  unrolled = tiny_model(remat_policy=remat)
  scanned = unrolled.clone(scan_blocks=True)
  variables = tiny_variables()
  scanned_vars = params_lib.to_variables(params_lib.canonical(variables), scan_blocks=True)
  images = random_images(2, seed=3)
  want_out, want = sown(unrolled, variables, images, return_attention=True)
  got_out, got = sown(scanned, scanned_vars, images, return_attention=True)
  assert set(got) == {'blocks', 'patch_embed_out'}
  assert set(want) == {'patch_embed_out'} | {f'blocks_{i}' for i in range(DEPTH)}
  for name in 'qkv':
    stacked = got['blocks']['attn'][name]
    assert len(stacked) == 1 and stacked[0].shape == (DEPTH, 2, 2 + 1 + 20, HEADS, HD)
    np.testing.assert_allclose(block_intermediates(got, name),
                               block_intermediates(want, name), atol=1e-6, rtol=0)
  np.testing.assert_allclose(got['patch_embed_out'][0], want['patch_embed_out'][0], atol=1e-6)
  np.testing.assert_allclose(got_out['attention'], want_out['attention'], atol=1e-6)
  # Training-style gradients still flow through the sowing forward pass.
  loss = lambda v, m: m.apply(v, images, mutable=['intermediates'])[0]['prenorm'].sum()
  g_unrolled = params_lib.canonical(jax.grad(loss)(variables, unrolled))
  g_scanned = params_lib.canonical(jax.grad(loss)(scanned_vars, scanned))
  for name, g in g_unrolled.items():
    np.testing.assert_allclose(g_scanned[name], g, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize('scan', [False, True])
def test_each_call_appends_its_own_entry(scan):
  """Two forward passes in one apply (e.g. global and local crops): one entry each."""
  model = tiny_model(scan_blocks=scan)
  variables = params_lib.to_variables(params_lib.canonical(tiny_variables()), scan_blocks=scan)
  a, b = random_images(2, seed=4), random_images(1, 16, 16, seed=5)
  _, state = model.apply(variables, a, b, method=lambda m, x, y: (m(x), m(y)),
                         mutable=['intermediates'])
  inter = state['intermediates']
  assert [x.shape for x in inter['patch_embed_out']] == [(2, 20, DIM), (1, 4, DIM)]
  _, alone = sown(model, variables, b)
  np.testing.assert_allclose(block_intermediates(inter, 'k', call=1),
                             block_intermediates(alone, 'k'), atol=1e-6)
  assert block_intermediates(inter, 'k', call=0).shape == (DEPTH, 2, 23, HEADS, HD)


# --- attention implementations -------------------------------------------------------------

IMPLS = ('xla', 'per_example', 'cpu_flash', 'fused')
# (batch, tokens, heads, head_dim): T not a multiple of 8, batch 1 and 3.
SHAPES = ((1, 13, 2, 8), (3, 21, 4, 16), (3, 8, 1, 4), (2, 37, 6, 64))


def random_qkv(shape, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


def reference_attention(q, k, v):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  probs = softmax(np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1]))
  return np.einsum('bhqk,bkhd->bqhd', probs, v), probs


def rel_err(got, want) -> float:
  """max |got - want| / max |want| (an all-zero ``want``, e.g. the unused mask token's
  gradient, must be matched exactly)."""
  diff = np.abs(np.asarray(got, np.float64) - want).max()
  scale = np.abs(want).max()
  return float(diff / scale) if scale else float(diff and np.inf)


@pytest.mark.parametrize('shape', SHAPES)
def test_attention_impls_agree_on_outputs_and_probs(shape):
  q, k, v = random_qkv(shape)
  want_out, want_probs = reference_attention(q, k, v)
  for impl in IMPLS:
    out, none = attention_lib.dot_product_attention(q, k, v, impl=impl)
    assert none is None and out.shape == shape and out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - want_out).max() <= TOL, impl
    out, probs = attention_lib.dot_product_attention(q, k, v, impl=impl, return_probs=True)
    assert probs.shape == (shape[0], shape[2], shape[1], shape[1])
    assert probs.dtype == jnp.float32
    assert np.abs(np.asarray(out) - want_out).max() <= TOL, impl
    assert np.abs(np.asarray(probs) - want_probs).max() <= TOL, impl


@pytest.mark.parametrize('shape', SHAPES)
def test_attention_impls_agree_on_gradients(shape):
  q, k, v = random_qkv(shape, seed=1)
  rng = np.random.default_rng(2)
  cot_out = jnp.asarray(rng.normal(size=shape), jnp.float32)
  cot_probs = jnp.asarray(rng.normal(size=(shape[0], shape[2], shape[1], shape[1])), jnp.float32)

  def loss(impl, return_probs, q, k, v):
    out, probs = attention_lib.dot_product_attention(q, k, v, impl=impl,
                                                     return_probs=return_probs)
    total = (out * cot_out).sum()
    return total + (probs * cot_probs).sum() if return_probs else total

  for return_probs in (False, True):
    grads = {impl: jax.grad(functools.partial(loss, impl, return_probs), argnums=(0, 1, 2))(
        q, k, v) for impl in IMPLS}
    want = [np.asarray(g, np.float64) for g in grads['xla']]
    for impl in IMPLS[1:]:
      for name, got, ref in zip('qkv', grads[impl], want):
        assert rel_err(got, ref) <= TOL, (impl, return_probs, name, rel_err(got, ref))


def test_attention_impls_agree_inside_the_model():
  """Whole-model outputs, attention maps and parameter gradients, per implementation."""
  variables = tiny_variables()
  images = random_images(3, 24, 40, seed=6)  # 15 patches + 3 prefix = 18 tokens
  results = {}
  for impl in IMPLS:
    model = tiny_model(attention_impl=impl)
    out = model.apply(variables, images, return_attention=True)
    grad = jax.grad(lambda v: (model.apply(v, images)['patches'] ** 2).mean())(variables)
    results[impl] = out, params_lib.canonical(grad)
  want_out, want_grad = results['xla']
  for impl in IMPLS[1:]:
    out, grad = results[impl]
    for key in ('cls', 'registers', 'patches', 'attention'):
      assert np.abs(np.asarray(out[key]) - np.asarray(want_out[key])).max() <= TOL, (impl, key)
    for name, g in want_grad.items():
      assert rel_err(grad[name], np.asarray(g, np.float64)) <= TOL, (impl, name)


def test_unknown_impl_is_refused():
  q, k, v = random_qkv((1, 3, 1, 2))
  with pytest.raises(ValueError, match='unknown attention impl'):
    attention_lib.dot_product_attention(q, k, v, impl='flash')


def test_gelu_equals_float64_erf_and_its_gradient():
  """The MLP's exact GELU (torch's erf formula, not jax.nn.gelu's erfc path) and its gradient.

  Absolute error against float64, to the rounding of values O(|x|); relative
  accuracy in the far negative tail is not claimed (torch's formula cancels there too).
  """
  from math import erf, exp, pi, sqrt

  from vitreg_jax.models.layers import ACTIVATIONS
  gelu = ACTIVATIONS['gelu']
  x = np.linspace(-12, 12, 4801).astype(np.float32)
  exact = np.array([0.5 * v * (1 + erf(v / sqrt(2))) for v in x.astype(np.float64)])
  slope = np.array([0.5 * (1 + erf(v / sqrt(2))) + v * exp(-v * v / 2) / sqrt(2 * pi)
                    for v in x.astype(np.float64)])
  got = np.asarray(gelu(jnp.asarray(x)), np.float64)
  grad = np.asarray(jax.vmap(jax.grad(gelu))(jnp.asarray(x)), np.float64)
  scale = np.maximum(np.abs(x), 1.0)
  assert np.all(np.abs(got - exact) <= 2e-7 * scale)
  assert np.all(np.abs(grad - slope) <= 1e-6 * scale)
