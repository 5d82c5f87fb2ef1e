"""The CLIP model: pooling never sees registers, the text tower is causal and pools at EOT,
embeddings are unit-norm projections, the logit parameters start where OpenCLIP's do,
and the causal attention agrees across implementations. (Token ids equal
``open_clip.tokenize``: tests/test_data_tokenizer.py.)"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_testing
from vitreg_jax.convert import params as params_lib
from vitreg_jax.data.tokenizer import ClipTokenizer
from vitreg_jax.models import attention as attention_lib
from vitreg_jax.models.clip import CLIP, logits
from vitreg_jax.models.text import TextTransformer
from vitreg_jax.models.vit import VisionTransformer

TOL = 1e-5
EMBED, VOCAB, CONTEXT = 12, 50, 10


def tiny_clip(pool='cls', vocab=VOCAB, **clip_kwargs) -> CLIP:
  visual = VisionTransformer(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_registers=3,
                             img_size=32, layerscale_init=0.5)
  text = TextTransformer(vocab_size=vocab, context_length=CONTEXT, width=16, depth=2, num_heads=2,
                         embed_dim=EMBED)
  return CLIP(visual, text, embed_dim=EMBED, pool=pool, **clip_kwargs)


def images(batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, 32, 32, 3)), jnp.float32)


def token_ids(seed=0):
  """Rows ``[sot, words..., eot, 0...]``: sot = vocab-2, eot = vocab-1 (the largest id)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((3, CONTEXT), np.int32)
  for row, length in enumerate((3, 6, CONTEXT - 2)):
    ids[row, 0] = VOCAB - 2
    ids[row, 1:1 + length] = rng.integers(1, VOCAB - 2, length)
    ids[row, 1 + length] = VOCAB - 1
  return jnp.asarray(ids)


@functools.lru_cache(maxsize=None)
def outputs(pool):
  model = tiny_clip(pool)
  variables = clip_testing.random_variables(model)
  return model, variables, model.apply(variables, images(), token_ids())


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_pooled_feature_is_cls_or_the_patch_mean_never_registers(pool):
  model, variables, out = outputs(pool)
  patches, regs = np.asarray(out['patches']), np.asarray(out['registers'])
  assert regs.shape == (2, 3, 32) and patches.shape == (2, 16, 32)
  want = np.asarray(out['cls']) if pool == 'cls' else patches.mean(axis=1)
  np.testing.assert_allclose(out['image_pooled'], want, atol=1e-6)
  with_registers = np.concatenate([regs, patches], axis=1).mean(axis=1)
  assert np.abs(with_registers - np.asarray(out['image_pooled'])).max() > 1e-2
  projection = np.asarray(variables['params']['image_projection'])
  np.testing.assert_allclose(out['image_embeds'], unit(want @ projection), atol=1e-6)


def test_text_tower_pools_at_eot_and_is_causal():
  model, variables, out = outputs('cls')
  ids = token_ids()
  text = model.text.apply({'params': variables['params']['text']}, ids)
  eot = np.asarray(ids).argmax(-1)
  np.testing.assert_allclose(text['pooled'], np.asarray(text['tokens'])[np.arange(3), eot],
                             atol=1e-6)
  projection = np.asarray(variables['params']['text']['text_projection'])
  np.testing.assert_allclose(out['text_embeds'], unit(np.asarray(text['pooled']) @ projection),
                             atol=1e-6)
  # Tokens after EOT (padding) cannot reach it; a token before it does.
  after = ids.at[0, 6:].set(7)
  before = ids.at[0, 1].set(ids[0, 1] % (VOCAB - 3) + 1)
  embed = lambda t: np.asarray(model.apply(variables, t, method=CLIP.encode_text))
  np.testing.assert_allclose(embed(after), out['text_embeds'], atol=1e-6)
  assert np.abs(embed(before)[0] - np.asarray(out['text_embeds'])[0]).max() > 1e-3


def test_encoders_equal_the_joint_pass_and_logits_use_the_log_scale():
  model, variables, out = outputs('mean')
  image = model.apply(variables, images(), method=CLIP.encode_image)
  text = model.apply(variables, token_ids(), method=CLIP.encode_text)
  np.testing.assert_array_equal(image['embeds'], out['image_embeds'])
  np.testing.assert_array_equal(image['registers'], out['registers'])
  np.testing.assert_array_equal(text, out['text_embeds'])
  np.testing.assert_allclose(np.linalg.norm(out['image_embeds'], axis=-1), 1, atol=1e-6)
  assert out['logit_bias'] is None and 'logit_bias' not in variables['params']
  z = logits(out['image_embeds'], out['text_embeds'], out['logit_scale'])
  want = math.exp(float(out['logit_scale'])) * np.asarray(out['image_embeds']) @ np.asarray(text).T
  np.testing.assert_allclose(z, want, rtol=1e-6)


def test_logit_parameters_start_as_openclip_and_siglip():
  top = lambda m: m.init(jax.random.key(0), method=lambda c: c.logit_scale)['params']
  params = top(tiny_clip())  # the parameters CLIP itself owns (no tower is run)
  assert set(params) == {'image_projection', 'logit_scale'}
  assert float(params['logit_scale']) == pytest.approx(math.log(1 / 0.07))
  assert params['image_projection'].unbox().shape == (32, EMBED)
  params = top(tiny_clip(init_logit_scale=math.log(10), init_logit_bias=-10.0))
  assert float(params['logit_scale']) == pytest.approx(math.log(10))
  assert float(params['logit_bias']) == -10.0 and params['logit_bias'].shape == ()


def test_openclip_style_image_tower_fields():
  """norm_pre (LayerNorm before the blocks), no patch bias, QuickGELU: OpenCLIP's own ViT."""
  plain = VisionTransformer(patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16)
  clip_style = plain.clone(norm_pre=True, patch_bias=False, act='quick_gelu', num_registers=0)
  names = set(params_lib.expected_shapes(clip_style))
  assert {'norm_pre/scale', 'norm_pre/bias'} <= names and 'patch_embed/proj/bias' not in names
  assert 'norm_pre/scale' not in params_lib.expected_shapes(plain)
  with pytest.raises(ValueError, match="act='relu'"):
    plain.clone(act='relu').init(jax.random.key(0), images(1)[:, :16, :16])


def test_text_tower_scanned_equals_unrolled():
  model, variables, _ = outputs('cls')
  flat = params_lib.canonical(variables['params']['text'])
  scanned = model.text.clone(scan_blocks=True)
  stacked = params_lib.to_variables(flat, scan_blocks=True)
  got = scanned.apply(stacked, token_ids())['embeds']
  want = model.text.apply({'params': variables['params']['text']}, token_ids())['embeds']
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_real_tokenizer_ids_pool_at_their_end_of_text():
  tok = ClipTokenizer(context_length=CONTEXT)
  ids = tok.tokenize(['a photo of a dog', 'two words'])
  model = tiny_clip(vocab=tok.vocab_size)
  variables = clip_testing.random_variables(model)
  text = model.text.apply({'params': variables['params']['text']}, ids)
  ends = [list(row).index(tok.eot_id) for row in ids]
  np.testing.assert_array_equal(text['pooled'], np.asarray(text['tokens'])[np.arange(2), ends])


# --- causal attention -----------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(1, 7, 2, 8), (3, 12, 4, 4)])
def test_causal_attention_gradients_equal_xla(shape):
  """The CPU kernel's own backward (probabilities recomputed, masked keys included) gives the
  gradients autodiff of the plain formulation gives."""
  rng = np.random.default_rng(4)
  q, k, v, cot = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(4))

  def grads(impl):
    loss = lambda *a: (attention_lib.dot_product_attention(*a, impl=impl, causal=True)[0]
                       * cot).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for impl in ('per_example', 'cpu_flash'):
    for got, want in zip(grads(impl), grads('xla')):
      assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL * np.abs(want).max(), impl

@pytest.mark.parametrize('shape', [(1, 7, 2, 8), (3, 12, 4, 4)])
def test_causal_attention_impls_match_numpy(shape):
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  logits_ = np.einsum('bqhd,bkhd->bhqk', *(np.asarray(x, np.float64) for x in (q, k)))
  logits_ /= np.sqrt(shape[-1])
  logits_ = np.where(np.tril(np.ones((shape[1], shape[1]), bool)), logits_, -np.inf)
  probs = np.exp(logits_ - logits_.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum('bhqk,bkhd->bqhd', probs, np.asarray(v, np.float64))
  for impl in ('xla', 'per_example', 'cpu_flash', 'fused'):
    out, _ = attention_lib.dot_product_attention(q, k, v, impl=impl, causal=True)
    assert np.abs(np.asarray(out) - want).max() <= TOL, impl
    out, p = attention_lib.dot_product_attention(q, k, v, impl=impl, causal=True,
                                                 return_probs=True)
    assert np.abs(np.asarray(p) - probs).max() <= TOL, impl
