"""DINO / iBOT / KoLeo losses and teacher targets against the official DINOv2 modules.

The reference outputs come from tests/testdata/dinov2_losses.npz (README
there): gathered masked patches, crop-major rows. The tests rebuild our
crop-axis / dense layouts from them and must reproduce every output, both
called eagerly and under ``jax.jit`` as the train step runs them (XLA fusion
changes rounding: KoLeo once differed by 1.8e-3 relative under jit only).
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vitreg_jax.losses import centering, dino, ibot, koleo

VECTORS = pathlib.Path(__file__).parent / 'testdata' / 'dinov2_losses.npz'
MODES = ('centering', 'sinkhorn_knopp')
RUNNERS = ('eager', 'jit')
RTOL = 1e-5


@functools.lru_cache(maxsize=1)
def _vectors():
  return dict(np.load(VECTORS))


@pytest.fixture
def ref():
  v = _vectors()
  b, n = v['masks'].shape[0] // 2, v['masks'].shape[1]
  k = v['student_global_head'].shape[1]
  n_local = int(v['n_local_crops'])
  masks = v['masks'].reshape(2, b, n)
  flat_idx = np.flatnonzero(v['masks'].reshape(-1))
  # Dense [2, B, N, K] patch logits: the reference's masked rows scattered to
  # their patches, large finite garbage elsewhere (which must not matter).
  rng = np.random.default_rng(0)
  dense = {}
  for who in ('student', 'teacher'):
    x = rng.normal(0.0, 40.0, (2 * b * n, k)).astype(np.float32)
    x[flat_idx] = v[f'{who}_masked_patch_head']
    dense[who] = x.reshape(2, b, n, k)
  return dict(
      v=v, b=b, n=n, k=k, n_local=n_local, masks=masks, flat_idx=flat_idx,
      temp=float(v['teacher_temp']),
      student_global=v['student_global_head'].reshape(2, b, k),
      teacher_global=v['teacher_global_head'].reshape(2, b, k),
      student_local=v['student_local_head'].reshape(n_local, b, k),
      cls_backbone=v['student_global_cls_backbone'].reshape(2, b, -1),
      student_dense=dense['student'], teacher_dense=dense['teacher'])


@pytest.fixture(params=RUNNERS)
def run(request):
  """``run(fn, *arrays)``: eagerly, or jitted with ``fn``'s other arguments static."""
  if request.param == 'eager':
    return lambda fn, *arrays: fn(*arrays)
  return lambda fn, *arrays: jax.jit(fn)(*arrays)


def _close(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _dino_center(r):
  return r['v']['center_dino'][0]


def _ibot_center(r):
  return r['v']['center_ibot'][0, 0]


@pytest.mark.parametrize('mode', MODES)
def test_teacher_cls_targets_match_reference(ref, mode, run):
  probs = run(lambda t, c: centering.teacher_probs(t, ref['temp'], mode, center=c),
              ref['teacher_global'], _dino_center(ref))
  swapped = np.asarray(probs)[::-1].reshape(2 * ref['b'], ref['k'])  # reference stores cat(crop1, crop0)
  _close(swapped, ref['v'][f'{mode}/teacher_cls_probs'])


@pytest.mark.parametrize('mode', MODES)
def test_teacher_patch_targets_dense_match_reference(ref, mode, run):
  probs = run(lambda t, c, m: centering.teacher_probs(t, ref['temp'], mode, center=c, valid=m),
              ref['teacher_dense'], _ibot_center(ref), ref['masks'])
  masked_rows = np.asarray(probs).reshape(-1, ref['k'])[ref['flat_idx']]
  _close(masked_rows, ref['v'][f'{mode}/teacher_patch_probs'])
  if mode == 'sinkhorn_knopp':  # unmasked patches carry no assignment mass
    assert np.all(np.asarray(probs)[~ref['masks']] == 0.0)


def test_center_updates_match_reference(ref, run):
  new_dino = run(lambda c, t: centering.update_center(c, t, momentum=0.9),
                 _dino_center(ref), ref['teacher_global'])
  _close(new_dino, ref['v']['centering/new_center_dino'][0])
  new_ibot = run(lambda c, t, m: centering.update_center(c, t, momentum=0.9, valid=m),
                 _ibot_center(ref), ref['teacher_dense'], ref['masks'])
  _close(new_ibot, ref['v']['centering/new_center_ibot'][0, 0])


def _all_losses(r, mode, student_patches, teacher_patches, weights, valid, n_images,
                run=lambda fn, *arrays: fn(*arrays)):
  return run(functools.partial(_losses_of, mode=mode, n_images=n_images, temp=r['temp']),
             r['teacher_global'], _dino_center(r), r['student_global'], r['student_local'],
             teacher_patches, _ibot_center(r), student_patches, weights, valid, r['cls_backbone'])


def _losses_of(teacher_global, center, student_global, student_local, teacher_patches,
               center_ibot, student_patches, weights, valid, cls_backbone, *, mode, n_images,
               temp):
  probs = centering.teacher_probs(teacher_global, temp, mode, center=center)
  global_loss, local_loss = dino.dino_loss(student_global, probs, student_local)
  patch_probs = centering.teacher_probs(teacher_patches, temp, mode, center=center_ibot,
                                        valid=valid)
  ibot_loss = ibot.ibot_loss(student_patches, patch_probs, weights, n_images)
  koleo_loss = 0.1 * koleo.koleo_loss(cls_backbone)
  return dict(dino_global_crops_loss=global_loss, dino_local_crops_loss=local_loss,
              ibot_loss_weighted=ibot_loss, koleo_loss_weighted=koleo_loss,
              total_loss=global_loss + local_loss + ibot_loss + koleo_loss)


@pytest.mark.parametrize('mode', MODES)
def test_losses_dense_match_reference(ref, mode, run):
  out = _all_losses(ref, mode, ref['student_dense'], ref['teacher_dense'],
                    ibot.masked_patch_weights(ref['masks']), ref['masks'], 2 * ref['b'], run)
  for name, value in out.items():
    _close(value, ref['v'][f'{mode}/{name}'])


@pytest.mark.parametrize('mode', MODES)
def test_losses_gathered_match_reference(ref, mode, run):
  """The fixed-budget gathered layout reproduces the reference's ordered masked list."""
  budget = ibot.mask_budget(2 * ref['b'], ref['n'])
  sel = ibot.select_masked_patches(ref['masks'], group_size=ref['b'], budget=budget)
  m = len(ref['flat_idx'])
  np.testing.assert_array_equal(np.asarray(sel.indices)[0, :m], ref['flat_idx'])
  assert int(sel.valid.sum()) == m and int(sel.n_dropped) == 0
  _close(np.asarray(sel.weights)[0, :m], ref['v']['masks_weight'])
  student = ibot.gather_patches(ref['student_dense'], sel, ref['b'])
  teacher = ibot.gather_patches(ref['teacher_dense'], sel, ref['b'])
  np.testing.assert_array_equal(np.asarray(student)[0, :m], ref['v']['student_masked_patch_head'])
  out = _all_losses(ref, mode, student, teacher, sel.weights, sel.valid, 2 * ref['b'], run)
  for name, value in out.items():
    _close(value, ref['v'][f'{mode}/{name}'])


def test_mask_budget_is_reference_upperbound():
  # 8 images, half masked: bins linspace(0.1, 0.5, 5) -> int(64 * [.2, .3, .4, .5]) = 12+19+25+32
  assert ibot.mask_budget(8, 64, (0.1, 0.5), 0.5) == 88
  # 2 images, 1 masked: int(256 * 0.5)
  assert ibot.mask_budget(2, 256) == 128


def test_select_masked_patches_groups_and_overflow():
  masks = np.zeros((2, 4, 3), bool)
  masks[0, 1, [0, 2]] = True    # group 0: crop 0 image 1
  masks[1, 0, 1] = True         # group 0: crop 1 image 0
  masks[1, 3, :] = True         # group 1: crop 1 image 3, 3 patches
  sel = ibot.select_masked_patches(masks, group_size=2, budget=2)
  # group layout [crop, image-in-group, patch] flattened: crop-major like the reference
  np.testing.assert_array_equal(np.asarray(sel.indices[0]), [1 * 3 + 0, 1 * 3 + 2])
  np.testing.assert_array_equal(np.asarray(sel.indices[1]), [6 + 3, 6 + 4])
  np.testing.assert_allclose(np.asarray(sel.weights), [[0.5, 0.5], [1 / 3, 1 / 3]])
  assert int(sel.n_dropped) == 2  # group 0 lost crop 1's patch, group 1 one of 3


def test_koleo_finite_with_duplicates_and_zero_rows():
  rng = np.random.default_rng(1)
  base = rng.normal(size=(2, 8, 16)).astype(np.float32)
  cases = {
      'all duplicates': np.repeat(base[:, :1], 8, axis=1),
      'duplicate pairs': np.repeat(base[:, :4], 2, axis=1),
      'zero rows': np.concatenate([np.zeros((2, 2, 16), np.float32), base[:, 2:]], axis=1),
  }
  value_and_grad = jax.jit(jax.value_and_grad(koleo.koleo_loss), static_argnums=1)
  for name, x in cases.items():
    for group_size in (2, 4, None):
      value, grad = value_and_grad(jnp.asarray(x), group_size)
      assert np.isfinite(value), (name, group_size)
      assert np.all(np.isfinite(grad)), (name, group_size)


def _koleo_numpy(x, eps=1e-8):
  """Independent NumPy KoLeo for one batch [B, D] (torch PairwiseDistance semantics)."""
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  dots = x @ x.T
  np.fill_diagonal(dots, -1.0)
  nn = np.argmax(dots, axis=1)
  dist = np.linalg.norm(x - x[nn] + eps, axis=-1)
  return -np.mean(np.log(dist + eps))


def test_koleo_groups_average_per_group_values(run):
  x = np.random.default_rng(2).normal(size=(2, 12, 8))
  x[:, 4] = x[:, 3]  # a duplicate pair inside a group: distance exactly sqrt(D) * eps
  expected = sum(np.mean([_koleo_numpy(x[c, g * 3:(g + 1) * 3]) for g in range(4)]) for c in range(2))
  _close(run(lambda a: koleo.koleo_loss(a, group_size=3), jnp.asarray(x, jnp.float32)), expected)
  with pytest.raises(ValueError, match='group_size'):
    koleo.koleo_loss(jnp.asarray(x), group_size=5)
  with pytest.raises(ValueError, match='group_size'):
    koleo.koleo_loss(jnp.asarray(x), group_size=1)


def test_bad_inputs_raise_clear_errors(ref):
  with pytest.raises(ValueError, match='centering mode'):
    centering.teacher_probs(ref['teacher_global'], 0.05, 'sinkhorn')
  with pytest.raises(ValueError, match='needs the EMA center'):
    centering.teacher_probs(ref['teacher_global'], 0.05, 'centering')
  with pytest.raises(ValueError, match='2 global crops'):
    dino.dino_loss(ref['student_local'], ref['student_local'])
  with pytest.raises(ValueError, match='valid shape'):
    centering.sinkhorn_knopp(ref['teacher_dense'], 0.05, valid=ref['masks'][0])


# ---------------------------------------------------------------------------
# Sharded over 8 simulated devices == one device.

def _losses_step(inputs, mode, koleo_group, ibot_group, budget, temp=0.05):
  """Everything the train step computes from head outputs, on global arrays."""
  probs = centering.teacher_probs(inputs['teacher_global'], temp, mode, center=inputs['center'])
  dino_global, dino_local = dino.dino_loss(inputs['student_global'], probs, inputs['student_local'])
  sel = ibot.select_masked_patches(inputs['masks'], ibot_group, budget)
  student = ibot.gather_patches(inputs['student_patches'], sel, ibot_group)
  teacher = ibot.gather_patches(inputs['teacher_patches'], sel, ibot_group)
  patch_probs = centering.teacher_probs(teacher, temp, mode, center=inputs['center_ibot'],
                                        valid=sel.valid)
  n_images = 2 * inputs['masks'].shape[1]
  dense_probs = centering.teacher_probs(inputs['teacher_patches'], temp, mode,
                                        center=inputs['center_ibot'], valid=inputs['masks'])
  return dict(
      probs=probs, dino_global=dino_global, dino_local=dino_local,
      ibot=ibot.ibot_loss(student, patch_probs, sel.weights, n_images),
      ibot_dense=ibot.ibot_loss(inputs['student_patches'], dense_probs,
                                ibot.masked_patch_weights(inputs['masks']), n_images),
      koleo=koleo.koleo_loss(inputs['cls'], koleo_group),
      center=centering.update_center(inputs['center'], inputs['teacher_global']),
      center_ibot=centering.update_center(inputs['center_ibot'], teacher, valid=sel.valid))


def _random_inputs(b=16, n_local=3, n=12, k=32, d=16):
  rng = np.random.default_rng(3)
  f = lambda *s, scale=1.0: (scale * rng.normal(size=s)).astype(np.float32)
  masks = rng.random((2, b, n)) < 0.3
  masks[:, ::3] = False  # some images unmasked, as in training
  cls = f(2, b, d)
  cls[:, 1] = cls[:, 0]  # duplicates inside a group
  return dict(
      student_global=f(2, b, k, scale=3), teacher_global=f(2, b, k), student_local=f(n_local, b, k, scale=3),
      student_patches=f(2, b, n, k, scale=3), teacher_patches=f(2, b, n, k), masks=masks, cls=cls,
      center=f(k, scale=0.1), center_ibot=f(k, scale=0.1))


@pytest.mark.parametrize('mode', MODES)
def test_sharded_equals_single_device(mode):
  inputs = _random_inputs()
  group = 2  # per-device batch on 8 devices
  budget = ibot.mask_budget(2 * group, 12, (0.0, 1.0), 1.0)  # every patch may be masked
  step = jax.jit(functools.partial(_losses_step, mode=mode, koleo_group=group, ibot_group=group,
                                   budget=budget))
  single = jax.device_get(step(jax.device_put(inputs, jax.devices()[0])))

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  batch_axis = {'student_global': 1, 'teacher_global': 1, 'student_local': 1, 'student_patches': 1,
                'teacher_patches': 1, 'masks': 1, 'cls': 1}

  def spec(name, x):
    if name not in batch_axis:
      return NamedSharding(mesh, P())
    axes = [None] * x.ndim
    axes[batch_axis[name]] = 'data'
    return NamedSharding(mesh, P(*axes))

  with jax.set_mesh(mesh):
    sharded_inputs = {k: jax.device_put(v, spec(k, v)) for k, v in inputs.items()}
    assert len(sharded_inputs['student_patches'].sharding.device_set) == 8
    sharded = jax.device_get(step(sharded_inputs))
  for name in single:
    _close(sharded[name], single[name])
  assert np.isfinite(single['koleo']) and single['ibot'] != 0.0
  # the gathered and dense iBOT layouts agree (budget holds every masked patch)
  _close(single['ibot'], single['ibot_dense'])
