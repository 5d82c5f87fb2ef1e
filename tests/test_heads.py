"""DINO head against the official DINOv2 DINOHead outputs (test vectors)."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax.models.heads import DINOHead

VECTORS = pathlib.Path(__file__).parent / 'testdata' / 'dinov2_losses.npz'


def _reference_head_params(v):
  """Torch layout ``head/*`` -> our names: Linear ``[out, in]`` -> kernel ``[in, out]``."""
  mlp = {f'layers_{j}': {'kernel': v[f'head/mlp.{j}.weight'].T, 'bias': v[f'head/mlp.{j}.bias']}
         for j in (0, 2, 4)}
  last = {'weight_g': v['head/last_layer.weight_g'].T, 'weight_v': v['head/last_layer.weight_v'].T}
  return {'mlp': mlp, 'last_layer': last}


def _reference_head():
  return DINOHead(out_dim=96, hidden_dim=64, bottleneck_dim=32, nlayers=3)


def test_dino_head_matches_reference():
  v = np.load(VECTORS)
  head = _reference_head()
  params = _reference_head_params(v)
  # the converted tree has exactly the structure and shapes the module creates
  init_shapes = jax.eval_shape(lambda: nn.meta.unbox(head.init(jax.random.key(0), v['head_input'])))
  assert jax.tree.map(lambda x: x.shape, init_shapes['params']) == \
      jax.tree.map(lambda x: x.shape, params)
  out = head.apply({'params': params}, v['head_input'])
  assert out.dtype == jnp.float32
  expected = v['head_output']
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_dino_head_init_and_logical_axes():
  head = DINOHead(out_dim=40, hidden_dim=24, bottleneck_dim=16, nlayers=3)
  variables = head.init(jax.random.key(0), jnp.zeros((2, 12)))
  names = jax.tree.map(lambda b: b.names, variables['params'],
                       is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert names['mlp']['layers_0'] == {'kernel': ('embed', 'mlp'), 'bias': ('mlp',)}
  assert names['mlp']['layers_2'] == {'kernel': (None, 'mlp'), 'bias': ('mlp',)}
  assert names['mlp']['layers_4'] == {'kernel': ('mlp', None), 'bias': (None,)}
  assert names['last_layer'] == {'weight_g': (None, 'prototypes'), 'weight_v': (None, 'prototypes')}
  params = nn.meta.unbox(variables)['params']
  np.testing.assert_array_equal(params['last_layer']['weight_g'], np.ones((1, 40)))
  # weight_v keeps torch's default Linear init: U(-1/sqrt(in), 1/sqrt(in)), in = bottleneck
  w = np.asarray(params['last_layer']['weight_v'])
  bound = 1 / np.sqrt(16)
  assert w.shape == (16, 40) and np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
  assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound
  for j in (0, 2, 4):
    assert np.all(params['mlp'][f'layers_{j}']['bias'] == 0)
    assert abs(np.std(params['mlp'][f'layers_{j}']['kernel']) - 0.02) < 0.005


def test_dino_head_weight_norm_scale_invariance_and_bf16():
  """Logits depend on weight_v only through its column directions; norm is in fp32."""
  head = _reference_head()
  v = np.load(VECTORS)
  params = _reference_head_params(v)
  scaled = jax.tree.map(lambda x: x, params)
  scaled['last_layer']['weight_v'] = params['last_layer']['weight_v'] * np.linspace(0.5, 3, 96)
  x = v['head_input']
  np.testing.assert_allclose(head.apply({'params': scaled}, x), head.apply({'params': params}, x),
                             rtol=1e-5, atol=1e-6)
  bf16 = DINOHead(out_dim=96, hidden_dim=64, bottleneck_dim=32, dtype=jnp.bfloat16)
  out = bf16.apply({'params': params}, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, v['head_output'], atol=0.02 * np.abs(v['head_output']).max())
