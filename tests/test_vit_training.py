"""Training-time details of the ViT that DINOv2 fixes: patch-embed init, drop path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
import torch

from vitreg_jax.models import layers
from vitreg_jax.models.vit import PatchProjection, VisionTransformer


def test_patch_embed_init_is_torch_conv2d_default():
  """DINOv2 keeps torch's Conv2d init for patch_embed: weight and bias U(+-1/sqrt(3 p^2))."""
  p, dim = 14, 384
  params = nn.unbox(PatchProjection(p, dim).init(jax.random.key(0), jnp.zeros((1, p, p, 3))))
  params = params['params']
  kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
  conv = torch.nn.Conv2d(3, dim, p, p)  # torch's own default init, for the numbers
  bound = 1 / np.sqrt(3 * p * p)
  assert bound == pytest.approx(0.0412, abs=1e-4)  # REFERENCE §1
  for ours, theirs in ((kernel, conv.weight.detach().numpy()), (bias, conv.bias.detach().numpy())):
    assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
    assert np.abs(ours).max() > 0.95 * bound  # uniform up to the bound, not a narrower law
    assert stats.kstest(ours.ravel(), stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3
  assert kernel.std() == pytest.approx(conv.weight.std().item(), rel=0.02)
  assert kernel.std() == pytest.approx(0.0238, abs=2e-4)


def test_subset_drop_path_matches_the_reference_formula():
  """Per group: an exact subset of max(int(g (1 - p)), 1) rows gets g / subset * branch(x)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 3, 4)), jnp.float32)
  branch = lambda y: 2.0 * y + 1.0
  seen = []

  def counting_branch(y):
    seen.append(y.shape)
    return branch(y)

  rate, groups = 0.4, 3
  out = np.asarray(layers.add_residual_on_subset(x, counting_branch, rate, groups,
                                                 jax.random.key(1)))
  g = 12 // groups
  keep = max(int(g * (1 - rate)), 1)  # 2 of 4
  assert seen == [(groups * keep, 3, 4)]  # the branch only runs on the subset
  xs = np.asarray(x)
  changed = ~np.all(np.isclose(out, xs), axis=(1, 2))
  for group in range(groups):
    rows = np.arange(group * g, (group + 1) * g)
    assert changed[rows].sum() == keep
    for r in rows:
      want = xs[r] + (g / keep) * np.asarray(branch(xs[r])) if changed[r] else xs[r]
      np.testing.assert_allclose(out[r], want, rtol=1e-6)
  with pytest.raises(ValueError, match='do not split into 5 groups'):
    layers.add_residual_on_subset(x, branch, rate, 5, jax.random.key(1))


def test_drop_path_mode_is_checked():
  with pytest.raises(ValueError, match="valid: \\('sample', 'subset'\\)"):
    VisionTransformer(drop_path_mode='bernoulli').init(jax.random.key(0), jnp.zeros((1, 14, 14, 3)))


@pytest.mark.parametrize('mode', ['subset', 'sample'])
def test_block_drop_path_skips_whole_branches(mode):
  """In training each row either keeps a branch (scaled) or skips it; eval runs everything."""
  model = VisionTransformer(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_registers=2,
                            img_size=16, layerscale_init=1.0, drop_path_rate=0.5,
                            drop_path_mode=mode, drop_path_groups=2)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images)
  train = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
  again = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(train['prenorm'], again['prenorm'])  # a function of the key
  evaluated = model.apply(variables, images)
  assert not np.allclose(train['prenorm'], evaluated['prenorm'])
  if mode == 'subset':
    with pytest.raises(ValueError, match='train=False'):
      model.apply(variables, images, train=True, return_attention=True,
                  rngs={'dropout': jax.random.key(2)})
