"""The one feature pass: what is asked for, equal to the model's own forward pass (and to
NumPy for the derived norms), padding dropped, one compilation per input shape, the same
sharded over an 8-device mesh as on one device."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from vitreg_jax.analysis.features import FeaturePass
from vitreg_jax.convert import params as params_lib
from vitreg_jax.models.heads import ViTClassifier
from vitreg_jax.models.vit import VisionTransformer, block_intermediates
from vitreg_jax.parallel import mesh as mesh_lib
from vitreg_jax.parallel import rules as rules_lib

DIM, HEADS, DEPTH, REGISTERS = 32, 4, 2, 2
OUTPUTS = ('cls', 'registers', 'patches', 'prenorm', 'patch_norms', 'prenorm_norms', 'layers',
           'attention', 'q', 'k', 'v', 'patch_embed')


def tiny_model():
  return VisionTransformer(patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                           num_registers=REGISTERS, img_size=32, layerscale_init=0.5)


def tiny_variables(model, seed=0):
  rng = np.random.default_rng(seed)
  flat = {name: (0.2 * rng.standard_normal(spec.shape)).astype(np.float32)
          for name, spec in params_lib.expected_shapes(model).items()}
  return params_lib.to_variables(flat, scan_blocks=False)


def batches(n_batches, batch=8, padded_tail=3, seed=0):
  """Eval batches: images, labels, and ``valid`` with the last batch padded."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n_batches):
    valid = np.ones(batch, np.int32)
    if i == n_batches - 1:
      valid[batch - padded_tail:] = 0
    out.append({'image': rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
                'label': np.arange(i * batch, (i + 1) * batch, dtype=np.int32), 'valid': valid})
  return out


def reference(model, variables, images):
  """The model's own forward pass (+ sown internals) and NumPy norms, per output name."""
  out, state = model.apply(variables, images, return_layers=True, return_attention=True,
                           mutable=['intermediates'])
  inter = state['intermediates']
  ref = {k: np.asarray(out[k]) for k in ('cls', 'registers', 'patches', 'prenorm', 'layers',
                                          'attention')}
  ref['patch_norms'] = np.sqrt((np.asarray(out['patches'], np.float64) ** 2).sum(-1))
  ref['prenorm_norms'] = np.sqrt((np.asarray(out['prenorm'], np.float64) ** 2).sum(-1))
  for name in 'qkv':
    ref[name] = np.asarray(block_intermediates(inter, name)[-1])
  ref['patch_embed'] = np.asarray(inter['patch_embed_out'][0])
  return ref


def concat_valid(refs, data):
  """Reference outputs of all batches with padding rows dropped (layers first for per-layer)."""
  result = {}
  for name in refs[0]:
    per_layer = name in ('layers', 'attention')
    parts = [r[name][:, b['valid'] == 1] if per_layer else r[name][b['valid'] == 1]
             for r, b in zip(refs, data)]
    result[name] = np.concatenate(parts, axis=1 if per_layer else 0)
  return result


def test_feature_pass_returns_what_is_asked_for_without_padding():
  model = tiny_model()
  variables = tiny_variables(model)
  data = batches(3)
  features = FeaturePass(model, OUTPUTS)
  got = features.over(variables, data)
  want = concat_valid([reference(model, variables, b['image']) for b in data], data)
  assert set(got) == set(OUTPUTS) | {'label'}
  np.testing.assert_array_equal(got['label'], np.concatenate([b['label'][b['valid'] == 1]
                                                              for b in data]))
  assert got['cls'].shape == (21, DIM) and got['layers'].shape == (DEPTH, 21, 1 + 2 + 16, DIM)
  assert got['q'].shape == (21, 1 + 2 + 16, HEADS, DIM // HEADS)
  assert got['patch_embed'].shape == (21, 16, DIM)
  for name in OUTPUTS:
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=name)
  assert features.compilations == 1  # three batches, one shape
  features(variables, jnp.zeros((2, 40, 24, 3)))
  assert features.compilations == 2  # a new shape compiles once more

  first = features.over(variables, data, max_examples=10)
  assert first['cls'].shape == (10, DIM) and first['attention'].shape[1] == 10
  np.testing.assert_array_equal(first['cls'], got['cls'][:10])


def test_feature_pass_reads_a_classifier_and_its_wrapped_backbone():
  backbone = tiny_model()
  model = ViTClassifier(backbone, num_classes=3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  data = batches(1, padded_tail=0)
  got = FeaturePass(model, ('logits', 'cls', 'k', 'patch_embed')).over(variables, data)
  out, state = model.apply(variables, data[0]['image'], mutable=['intermediates'])
  np.testing.assert_allclose(got['logits'], out['logits'], atol=1e-6)
  inter = state['intermediates']['backbone']
  np.testing.assert_allclose(got['k'], block_intermediates(inter, 'k')[-1], atol=1e-6)
  np.testing.assert_allclose(got['patch_embed'], inter['patch_embed_out'][0], atol=1e-6)


def test_feature_pass_names_unknown_outputs():
  model = tiny_model()
  variables = tiny_variables(model)
  with pytest.raises(KeyError, match=r"returns no 'logits'.*derived"):
    FeaturePass(model, ('logits',)).over(variables, batches(1))


def test_sharded_feature_pass_equals_one_device():
  model = tiny_model()
  variables = tiny_variables(model, seed=1)
  data = batches(2, batch=16, padded_tail=5, seed=1)
  want = FeaturePass(model, OUTPUTS).over(variables, data)
  mesh = mesh_lib.create_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  rules = rules_lib.get_rules('fsdp')
  placed = [{k: jax.device_put(v, NamedSharding(mesh, P(('data', 'fsdp'))))
             for k, v in b.items()} for b in data]
  shardings = rules_lib.tree_shardings(
      model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))), rules, mesh)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))  # FSDP-sharded
  sharded_vars = jax.device_put(variables, shardings)
  got = FeaturePass(model, OUTPUTS, mesh=mesh, rules=rules).over(sharded_vars, placed)
  assert len(placed[0]['image'].sharding.device_set) == 8
  for name in OUTPUTS + ('label',):
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=name)
