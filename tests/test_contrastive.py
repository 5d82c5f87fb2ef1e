"""CLIP / SigLIP losses: against a float64 NumPy reference and open_clip, and across meshes.

The sharded runs (plain jit over batch-sharded inputs, and the chunked ring)
must give the single-device loss and its gradients w.r.t. every input: that is
the exact global-batch gradient OpenCLIP gets with ``--local-loss
--gather-with-grad`` (REFERENCE §10).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vitreg_jax.losses.contrastive import contrastive_loss
from vitreg_jax.parallel import rules
from vitreg_jax.parallel.mesh import create_mesh

KINDS = ('softmax', 'sigmoid')
TOL = 1e-5
LOG_SCALE = math.log(1 / 0.07)  # CLIP's init; the sharded tests use ln 100 (the clamp) too
BIAS = -2.71


def _embeddings(batch, dim, seed=0):
  rng = np.random.default_rng(seed)
  img, txt = rng.standard_normal((2, batch, dim))
  txt = 0.6 * img + 0.4 * txt  # some structure, so positives stand out
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return unit(img), unit(txt)


def _logsumexp(x, axis):
  top = x.max(axis=axis, keepdims=True)
  return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _log_sigmoid(x):
  return -(np.maximum(-x, 0.0) + np.log1p(np.exp(-np.abs(x))))


def _numpy_loss(kind, img, txt, log_scale, bias):
  img, txt = img.astype(np.float64), txt.astype(np.float64)
  logits = np.exp(log_scale) * img @ txt.T + (0.0 if bias is None else bias)
  batch = len(img)
  if kind == 'softmax':
    positives = np.diag(logits)
    image_ce = np.mean(_logsumexp(logits, axis=1) - positives)
    text_ce = np.mean(_logsumexp(logits, axis=0) - positives)
    return (image_ce + text_ce) / 2
  labels = 2 * np.eye(batch) - 1
  return -np.sum(_log_sigmoid(labels * logits)) / batch


def _close(actual, expected, tol=TOL):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('with_bias', [False, True])
@pytest.mark.parametrize('batch,dim', [(1, 4), (5, 3), (16, 32)])
def test_matches_numpy_reference(kind, with_bias, batch, dim):
  img, txt = _embeddings(batch, dim)
  bias = BIAS if with_bias else None
  loss = jax.jit(functools.partial(contrastive_loss, kind))(img, txt, LOG_SCALE, bias)
  _close(loss, _numpy_loss(kind, img, txt, LOG_SCALE, bias))


def test_bias_cancels_in_softmax():
  img, txt = _embeddings(8, 4)
  loss = jax.jit(jax.value_and_grad(functools.partial(contrastive_loss, 'softmax'), argnums=3))
  value, bias_grad = loss(img, txt, LOG_SCALE, BIAS)
  _close(value, _numpy_loss('softmax', img, txt, LOG_SCALE, None))
  assert float(bias_grad) == pytest.approx(0, abs=TOL)


def _value_and_grads(kind, impl=None, mesh=None):
  """Jitted ``(loss, (d_img, d_txt, d_log_scale, d_bias))``; ``impl=None``: one device, plain."""
  def loss(img, txt, log_scale, bias):
    if impl is None:
      return contrastive_loss(kind, img, txt, log_scale, bias)
    return contrastive_loss(kind, img, txt, log_scale, bias, impl=impl, mesh=mesh)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def _single_device(kind, img, txt, log_scale, bias):
  """Plain loss and gradients with every input on the first device."""
  on_one = jax.device_put((img, txt, log_scale, bias), jax.devices()[0])
  return _value_and_grads(kind)(*on_one)


def _assert_same(actual, expected):
  (value, grads), (ref_value, ref_grads) = actual, expected
  _close(value, ref_value)
  for name, grad, ref_grad in zip(('img', 'txt', 'log_scale', 'bias'), grads, ref_grads):
    assert grad.shape == ref_grad.shape, name
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=TOL, atol=TOL,
                               err_msg=f'd loss / d {name}')


MESHES = ({'data': 4, 'fsdp': 2}, {'data': 8}, {'data': 2, 'fsdp': 2, 'tensor': 2})


def _sharded_case(kind):
  """32 pairs at the largest logit scale (the clamp, ln 100); SigLIP's bias init."""
  img, txt = _embeddings(32, 16, seed=1)
  return img, txt, np.float32(math.log(100)), np.float32(-10.0 if kind == 'sigmoid' else BIAS)


@functools.lru_cache(maxsize=None)
def _sharded_case_expected(kind):
  return _single_device(kind, *_sharded_case(kind))


@pytest.mark.parametrize('mesh_shape', MESHES,
                         ids=lambda m: 'x'.join(f'{k}{v}' for k, v in m.items()))
@pytest.mark.parametrize('impl', ('plain', 'chunked'))
@pytest.mark.parametrize('kind', KINDS)
def test_sharded_equals_single_device(kind, impl, mesh_shape):
  mesh = create_mesh(mesh_shape)
  img, txt, log_scale, bias = _sharded_case(kind)
  expected = _sharded_case_expected(kind)
  by_rows = NamedSharding(mesh, P(rules.BATCH_MESH_AXES))
  img_sharded, txt_sharded = jax.device_put((img, txt), by_rows)
  actual = _value_and_grads(kind, impl, mesh)(img_sharded, txt_sharded, log_scale, bias)
  _assert_same(actual, expected)
  assert actual[1][0].sharding.is_equivalent_to(by_rows, 2)


@pytest.mark.parametrize('kind', KINDS)
def test_chunked_on_a_one_device_ring(kind):
  mesh = create_mesh({'data': 1}, devices=jax.devices()[:1])
  img, txt = _embeddings(6, 4, seed=2)
  actual = _value_and_grads(kind, 'chunked', mesh)(img, txt, np.float32(LOG_SCALE),
                                                   np.float32(BIAS))
  _assert_same(actual, _single_device(kind, img, txt, np.float32(LOG_SCALE), np.float32(BIAS)))


@pytest.mark.parametrize('impl', ('plain', 'chunked'))
@pytest.mark.parametrize('kind', KINDS)
def test_takes_the_context_mesh_inside_jit(kind, impl):
  """As a recipe calls it: inside its jitted step under ``rules.activate`` (abstract mesh)."""
  mesh = create_mesh({'data': 4, 'fsdp': 2})
  img, txt = _embeddings(16, 8, seed=3)

  @jax.jit
  def step(img, txt, log_scale, bias):
    with rules.activate(mesh, rules.get_rules('fsdp')):
      loss = lambda *args: contrastive_loss(kind, *args, impl=impl)
      return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(img, txt, log_scale, bias)

  by_rows = NamedSharding(mesh, P(rules.BATCH_MESH_AXES))
  args = (*jax.device_put((img, txt), by_rows), np.float32(LOG_SCALE), np.float32(BIAS))
  _assert_same(step(*args), _single_device(kind, img, txt, np.float32(LOG_SCALE),
                                           np.float32(BIAS)))


def _temp_bytes(kind, impl, mesh, batch, dim):
  by_rows = NamedSharding(mesh, P(rules.BATCH_MESH_AXES))
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=by_rows)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = _value_and_grads(kind, impl, mesh).lower(emb, emb, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('kind', KINDS)
def test_chunked_keeps_one_block_of_logits(kind):
  """Per device: plain holds B x B/W logits, the ring one B/W x B/W block (~W x less)."""
  mesh = create_mesh({'data': 8})
  batch, dim = 1024, 8
  plain = _temp_bytes(kind, 'plain', mesh, batch, dim)
  chunked = _temp_bytes(kind, 'chunked', mesh, batch, dim)
  local_block = 4 * (batch // 8) ** 2
  assert plain >= 8 * local_block, plain
  assert chunked <= 4 * local_block, (chunked, local_block)


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('kind', KINDS)
def test_matches_open_clip(kind):
  import torch  # pylint: disable=import-outside-toplevel
  from open_clip import loss as open_clip_loss  # pylint: disable=import-outside-toplevel

  img, txt = _embeddings(12, 8, seed=4)
  log_scale, bias = math.log(10.0), -10.0
  torch_img, torch_txt = (torch.tensor(x, requires_grad=True) for x in (img, txt))
  torch_log_scale = torch.tensor(log_scale, requires_grad=True)
  if kind == 'softmax':
    bias = None
    expected = open_clip_loss.ClipLoss()(torch_img, torch_txt, torch_log_scale.exp())
  else:  # one process: the local batch is the global batch
    expected = open_clip_loss.SigLipLoss()(torch_img, torch_txt, torch_log_scale.exp(),
                                           torch.tensor(bias))
  expected.backward()
  loss = lambda i, t, s: contrastive_loss(kind, i, t, s, bias)
  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(img, txt, np.float32(log_scale))
  _close(value, expected.item())
  for grad, ref in zip(grads, (torch_img, torch_txt, torch_log_scale)):
    _close(grad, ref.grad.numpy())


def test_bad_arguments_name_the_problem():
  img, txt = _embeddings(12, 4)
  mesh = create_mesh({'data': 8})
  with pytest.raises(ValueError, match="kind 'hinge'"):
    contrastive_loss('hinge', img, txt, LOG_SCALE)
  with pytest.raises(ValueError, match="impl 'ring'"):
    contrastive_loss('softmax', img, txt, LOG_SCALE, impl='ring')
  with pytest.raises(ValueError, match='global batch 12 does not divide over the 8 devices'):
    contrastive_loss('sigmoid', img, txt, LOG_SCALE, impl='chunked', mesh=mesh)
  with pytest.raises(ValueError, match='needs a mesh'):
    contrastive_loss('sigmoid', img, txt, LOG_SCALE, impl='chunked')
  with pytest.raises(ValueError, match=r"\['batch'\] are not axes of the mesh"):
    contrastive_loss('sigmoid', img, txt, LOG_SCALE, impl='chunked', mesh=mesh,
                     batch_axes='batch')
  with pytest.raises(ValueError, match='must both be'):
    contrastive_loss('softmax', img, txt[:8], LOG_SCALE)
