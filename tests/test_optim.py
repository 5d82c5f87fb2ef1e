"""The optimiser: DINOv2 schedules (closed forms), the parameter table (per-name
multipliers, DINOv2's and DeiT-III's rows), AdamW parity with torch param
groups, LAMB parity with timm's Lamb (apex FusedLAMB semantics) and NumPy."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from vitreg_jax.models.heads import DINOHead
from vitreg_jax.models.vit import get_arch
from vitreg_jax.train import optim
from vitreg_jax.recipes import deit3, dinov2_optim
from vitreg_jax.recipes.dinov2_optim import DinoV2Schedules
from vitreg_jax.train.schedules import cosine_schedule, scaled_lr

# ---------------------------------------------------------------------------
# Schedules: values at chosen steps against closed forms written out here.


def _lr_closed(t, peak, min_lr, warmup, total):
  if t >= total:
    return min_lr
  if t < warmup:  # linspace(0, peak, warmup): the last warmup step reaches peak
    return peak * t / (warmup - 1)
  return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def _cos_closed(t, start, end, total):
  return end if t >= total else end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / total))


def _temp_closed(t, warm_start, temp, warmup):
  return temp if t >= warmup else warm_start + (temp - warm_start) * t / (warmup - 1)


@pytest.mark.parametrize('epoch_length,epochs,warmup,temp_warmup', [(7, 10, 2, 3), (1250, 100, 10, 30)])
def test_schedules_match_closed_forms(epoch_length, epochs, warmup, temp_warmup):
  s = DinoV2Schedules(lr=2e-3, epochs=epochs, epoch_length=epoch_length, warmup_epochs=warmup,
                      warmup_teacher_temp_epochs=temp_warmup, freeze_last_layer_epochs=1)
  total, w, tw = epochs * epoch_length, warmup * epoch_length, temp_warmup * epoch_length
  steps = sorted({0, 1, epoch_length - 1, epoch_length, w - 1, w, w + 1, tw - 1, tw, (w + total) // 2,
                  total - 1, total, total + 5})
  all_at = jax.jit(s.all)
  for t in steps:
    lr = _lr_closed(t, 2e-3, 1e-6, w, total)
    expected = dict(lr=lr, last_layer_lr=0.0 if t < epoch_length else lr,
                    wd=_cos_closed(t, 0.04, 0.4, total), momentum=_cos_closed(t, 0.992, 1.0, total),
                    teacher_temp=_temp_closed(t, 0.04, 0.07, tw))
    got = jax.device_get(all_at(t))
    for name, value in expected.items():
      np.testing.assert_allclose(got[name], value, rtol=2e-6, atol=1e-12, err_msg=f'{name} @ {t}')


def test_freeze_prefix_and_lr_scaling():
  # CosineScheduler(freeze_iters=3, warmup 2): 0, 0, 0, start, base, cosine...
  vals = [float(cosine_schedule(t, 1.0, 0.0, 9, warmup_steps=2, start_warmup_value=0.5,
                                freeze_steps=3)) for t in range(10)]
  np.testing.assert_allclose(vals[:5], [0, 0, 0, 0.5, 1.0])
  np.testing.assert_allclose(vals[5:], [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)] + [0.0],
                             atol=1e-7)
  assert scaled_lr(4e-3, 2048) == pytest.approx(4e-3 * math.sqrt(2))
  assert scaled_lr(4e-3, 256) == pytest.approx(2e-3)
  with pytest.raises(ValueError, match='warmup_epochs'):
    DinoV2Schedules(lr=1.0, epochs=5, warmup_epochs=6)


# ---------------------------------------------------------------------------
# Per-parameter multipliers, checked against the reference rules written on
# torch-style names (dinov2/utils/param_groups.py semantics).


def _torch_name(path):
  """Our path (within a submodule) -> the reference parameter name."""
  parts = []
  for p in path:
    if p.startswith('blocks_'):
      parts += ['blocks', p.split('_')[1]]
    elif p.startswith('layers_'):
      parts.append(p.split('_')[1])
    else:
      parts.append({'kernel': 'weight', 'scale': 'weight'}.get(p, p))
  return '.'.join(parts)


def _reference_rules(submodule, name, depth, rate, patch_mult):
  if submodule == 'backbone':
    if any(t in name for t in ('pos_embed', 'patch_embed', 'mask_token', 'cls_token', 'register_tokens')):
      layer_id = 0
    elif name.startswith('blocks.'):
      layer_id = int(name.split('.')[1]) + 1
    else:
      layer_id = depth + 1
    lr = rate ** (depth + 1 - layer_id)
  else:
    lr = 1.0  # heads have no blocks: layer_id = 1 = num_layers + 1
  if 'patch_embed' in name:
    lr *= patch_mult
  wd = 0.0 if name.endswith('.bias') or 'norm' in name or 'gamma' in name else 1.0
  return lr, wd, 'last_layer' in name


def _student_shapes(scan_blocks, unbox=True, **overrides):
  vit = get_arch('vits14_reg', depth=3, img_size=28, scan_blocks=scan_blocks, **overrides)
  dim = vit.embed_dim
  head = DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=16)
  key = jax.random.key(0)
  shapes = jax.eval_shape(lambda: {
      'backbone': vit.init(key, jnp.zeros((1, 28, 28, 3)))['params'],
      'dino_head': head.init(key, jnp.zeros((1, dim)))['params'],
      'ibot_head': head.init(key, jnp.zeros((1, dim)))['params']})
  return nn.meta.unbox(shapes) if unbox else shapes


def _leaves(tree):
  return {optim.dict_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_multipliers_unscanned_follow_reference_rules():
  shapes = _student_shapes(scan_blocks=False)
  lr, wd, last = (_leaves(t) for t in dinov2_optim.param_multipliers(shapes, 0.9, 0.2))
  # flax LogicallyPartitioned boxes (params straight from init) give the same multipliers
  boxed = _leaves(dinov2_optim.param_multipliers(_student_shapes(False, unbox=False), 0.9, 0.2)[0])
  assert boxed == lr
  assert len(lr) == len(_leaves(shapes)) > 60
  for path in lr:
    exp_lr, exp_wd, exp_last = _reference_rules(path[0], _torch_name(path[1:]), 3, 0.9, 0.2)
    assert lr[path] == pytest.approx(exp_lr, rel=1e-6), path
    assert (wd[path], last[path]) == (exp_wd, exp_last), path
  # spot checks with literal values
  b = 'backbone'
  assert lr[(b, 'cls_token')] == pytest.approx(0.9 ** 4)
  assert lr[(b, 'register_tokens')] == pytest.approx(0.9 ** 4)
  assert lr[(b, 'patch_embed', 'proj', 'kernel')] == pytest.approx(0.2 * 0.9 ** 4)
  assert lr[(b, 'blocks_0', 'attn', 'qkv', 'kernel')] == pytest.approx(0.9 ** 3)
  assert lr[(b, 'blocks_2', 'mlp', 'fc2', 'bias')] == pytest.approx(0.9)
  assert lr[(b, 'norm', 'scale')] == 1.0 and lr[('dino_head', 'mlp', 'layers_0', 'kernel')] == 1.0
  assert wd[(b, 'blocks_1', 'ls1', 'gamma')] == 0 and wd[(b, 'blocks_1', 'norm2', 'scale')] == 0
  assert wd[(b, 'pos_embed')] == 1 and wd[(b, 'mask_token')] == 1  # tokens are decayed upstream
  assert wd[('dino_head', 'last_layer', 'weight_g')] == 1
  assert {p for p, v in last.items() if v} == {
      (h, 'last_layer', w) for h in ('dino_head', 'ibot_head') for w in ('weight_g', 'weight_v')}


def test_multipliers_scanned_are_per_layer_vectors():
  flat = _leaves(dinov2_optim.param_multipliers(_student_shapes(False), 0.9, 0.2)[0])
  scanned_shapes = _student_shapes(True)
  scanned = _leaves(dinov2_optim.param_multipliers(scanned_shapes, 0.9, 0.2)[0])
  shapes = _leaves(scanned_shapes)
  n_block_leaves = 0
  for path, mult in scanned.items():
    if path[1] != 'blocks':
      assert mult == flat[path], path
      continue
    n_block_leaves += 1
    assert mult.shape == (3,) + (1,) * (len(shapes[path].shape) - 1), path
    per_layer = [flat[(path[0], f'blocks_{i}') + path[2:]] for i in range(3)]
    np.testing.assert_allclose(mult.reshape(3), per_layer, rtol=1e-6)
    np.testing.assert_allclose(mult.reshape(3), [0.9 ** 3, 0.9 ** 2, 0.9], rtol=1e-6)
  assert n_block_leaves == 14  # norm1/2 (2+2), qkv, proj, fc1, fc2 (2 each), ls1, ls2


def test_missing_backbone_key_is_a_clear_error():
  with pytest.raises(ValueError, match=r"no 'backbone' subtree; top-level keys: \['params'\]"):
    dinov2_optim.param_multipliers({'params': {'x': jnp.zeros(2)}})


# ---------------------------------------------------------------------------
# The optax chain against torch.optim.AdamW with the reference's param groups.

SCHEDULES = DinoV2Schedules(lr=0.01, epochs=4, epoch_length=2, warmup_epochs=1,
                            warmup_teacher_temp_epochs=1, freeze_last_layer_epochs=1)


def _small_student(seed=0):
  """Random values on the student tree's shapes (initialisers do not matter here)."""
  vit = get_arch('vits14_reg', depth=3, img_size=28, embed_dim=32, num_heads=2)
  head = DINOHead(out_dim=24, hidden_dim=16, bottleneck_dim=8)
  key = jax.random.key(0)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: {
      'backbone': vit.init(key, jnp.zeros((1, 28, 28, 3)))['params'],
      'dino_head': head.init(key, jnp.zeros((1, 32)))['params'],
      'ibot_head': head.init(key, jnp.zeros((1, 32)))['params']}))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), jnp.float32), shapes)


def _random_grads(params, step):
  """Large backbone grads (clipped), moderate dino-head, tiny ibot-head (not clipped)."""
  scale = {'backbone': 1.0, 'dino_head': 0.5, 'ibot_head': 1e-3}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(100 + step)
  grads = [rng.normal(size=v.shape).astype(np.float32) * scale[optim.dict_path(p)[0]] for p, v in leaves]
  return jax.tree.unflatten(treedef, grads)


def _torch_adamw_run(params, n_steps):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  torch_params, groups, submodules = [], [], {}
  for path, value in leaves:
    p = optim.dict_path(path)
    tp = torch.nn.Parameter(torch.tensor(np.asarray(value)))
    lr_mult, wd_mult, last = _reference_rules(p[0], _torch_name(p[1:]), 3, 0.9, 0.2)
    groups.append(dict(params=[tp], lr_multiplier=lr_mult, wd_multiplier=wd_mult, is_last_layer=last))
    submodules.setdefault(p[0], []).append(tp)
    torch_params.append(tp)
  opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))  # eps 1e-8 default
  total = 8
  for step in range(n_steps):
    lr = _lr_closed(step, 0.01, 1e-6, 2, total)
    last_lr = 0.0 if step < 2 else lr
    wd = _cos_closed(step, 0.04, 0.4, total)
    for g in opt.param_groups:  # dinov2 apply_optim_scheduler
      g['weight_decay'] = wd * g['wd_multiplier']
      g['lr'] = (last_lr if g['is_last_layer'] else lr) * g['lr_multiplier']
    grads = jax.tree.leaves(_random_grads(params, step))
    for tp, g in zip(torch_params, grads):
      tp.grad = torch.tensor(g)
    for sub in submodules.values():
      torch.nn.utils.clip_grad_norm_(sub, 3.0)
    opt.step()
  return [tp.detach().numpy() for tp in torch_params]


def _optax_run(params, n_steps, to_tree=lambda t: t, from_tree=lambda t: t):
  tx = dinov2_optim.dinov2_optimizer(SCHEDULES, layerwise_decay=0.9, patch_embed_lr_mult=0.2, clip_grad=3.0)
  params = to_tree(params)
  state = tx.init(params)

  @jax.jit
  def step_fn(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for step in range(n_steps):
    grads = to_tree(_random_grads(from_tree(params), step))
    params, state = step_fn(params, state, grads)
    history.append(from_tree(params))
  return history, state


def test_optimizer_matches_torch_adamw_with_reference_groups():
  params = _small_student()
  n_steps = 5  # covers lr 0 at step 0, frozen last layer (0, 1), warmup end, cosine
  expected = _torch_adamw_run(params, n_steps)
  history, state = _optax_run(params, n_steps)
  got = jax.tree.leaves(history[-1])
  # Compared relative to each leaf's total update: optax computes Adam's bias
  # correction 1 - 0.999**t in float32 (cancellation), torch in float64; that
  # alone gives ~1e-5 of the update in the first steps (measured 1.0e-5 for
  # plain Adam, 1.7e-5 here), whereas a wrong multiplier would be >= 1e-1.
  for (path, p0), a, b in zip(jax.tree_util.tree_flatten_with_path(params)[0], got, expected):
    update = np.abs(b - np.asarray(p0)).max()
    err = np.abs(a - b).max()
    assert err <= 5e-5 * update + 1e-9, ('/'.join(optim.dict_path(path)), err, update)
  # frozen prototypes for the first epoch (2 steps), moving afterwards; step 0 has lr 0
  for head in ('dino_head', 'ibot_head'):
    for name in ('weight_g', 'weight_v'):
      before = params[head]['last_layer'][name]
      np.testing.assert_array_equal(history[1][head]['last_layer'][name], before)
      assert not np.allclose(history[2][head]['last_layer'][name], before)
  np.testing.assert_array_equal(history[0]['backbone']['cls_token'], params['backbone']['cls_token'])
  # optimiser state: plain arrays shaped like the params, plus a step count
  assert int(state[-1].count) == n_steps
  adam = state[1]
  assert jax.tree.map(jnp.shape, adam.mu) == jax.tree.map(jnp.shape, params)


def _scan(tree, depth=3):
  bb = dict(tree['backbone'])
  blocks = [bb.pop(f'blocks_{i}') for i in range(depth)]
  bb['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**tree, 'backbone': bb}


def _unscan(tree, depth=3):
  bb = dict(tree['backbone'])
  blocks = bb.pop('blocks')
  for i in range(depth):
    bb[f'blocks_{i}'] = jax.tree.map(lambda x: x[i], blocks)
  return {**tree, 'backbone': bb}


def test_optimizer_scanned_equals_unscanned():
  params = _small_student()
  flat, _ = _optax_run(params, 3)
  scanned, _ = _optax_run(params, 3, to_tree=_scan, from_tree=_unscan)
  for a, b in zip(jax.tree.leaves(flat[-1]), jax.tree.leaves(scanned[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_clip_per_submodule_uses_torch_formula():
  grads = {'backbone': {'w': jnp.full((4,), 3.0)},    # norm 6 -> scaled to 3 / (6 + 1e-6)
           'dino_head': {'w': jnp.full((4,), 0.5)}}   # norm 1 -> unchanged
  clipped, _ = optim.clip_by_global_norm_per_submodule(3.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(clipped['backbone']['w'], 3.0 * 3.0 / (6.0 + 1e-6), rtol=1e-7)
  np.testing.assert_array_equal(clipped['dino_head']['w'], grads['dino_head']['w'])
  norms = optim.submodule_global_norms(grads)
  assert float(norms['backbone']) == pytest.approx(6.0) and float(norms['dino_head']) == pytest.approx(1.0)


def test_optimizer_state_shards_like_params():
  """With flax's logically partitioned params the state's moments carry the same
  logical names, so one rules table shards params and optimiser state alike;
  an update step runs on boxed, sharded params."""
  vit = get_arch('vits14_reg', depth=2, img_size=28, embed_dim=32, num_heads=2)
  head = DINOHead(out_dim=24, hidden_dim=16, bottleneck_dim=8)
  key = jax.random.key(0)
  boxed_shapes = jax.eval_shape(lambda: {
      'backbone': vit.init(key, jnp.zeros((1, 28, 28, 3)))['params'],
      'dino_head': head.init(key, jnp.zeros((1, 32)))['params']})
  tx = dinov2_optim.dinov2_optimizer(SCHEDULES)
  state_shapes = jax.eval_shape(tx.init, boxed_shapes)
  param_specs = nn.get_partition_spec(boxed_shapes)
  state_specs = nn.get_partition_spec(state_shapes)
  assert state_specs[1].mu == param_specs and state_specs[1].nu == param_specs
  assert state_specs[1].count == jax.sharding.PartitionSpec()

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rules = (('embed', 'data'), ('prototypes', 'data'))
  param_sh = nn.logical_to_mesh_sharding(param_specs, mesh, rules)
  state_sh = nn.logical_to_mesh_sharding(state_specs, mesh, rules)
  rng = np.random.default_rng(0)
  values = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(np.float32), boxed_shapes)
  with jax.set_mesh(mesh):
    params = jax.device_put(values, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    kernel = state[1].mu['backbone']['blocks_0']['attn']['qkv']['kernel']
    assert kernel.names == ('embed', None, 'heads', 'head_dim')
    assert kernel.value.sharding.spec == jax.sharding.PartitionSpec('data', None, None, None)
    grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
  assert int(state[-1].count) == 1
  assert jax.tree.structure(new) == jax.tree.structure(params)


# ---------------------------------------------------------------------------
# The table: rows matched by regex on the '/'-joined path; multipliers
# multiply, frozen_steps is the max; layer decay on top.


def _tiny_tree():
  """A small {backbone, head} tree with our flax names (2 unrolled blocks)."""
  rng = np.random.default_rng(0)
  n = lambda *s: rng.normal(0, 0.02, s).astype(np.float32)
  return {'backbone': {'cls_token': n(1, 1, 8), 'pos_embed': n(1, 5, 8),
                       'patch_embed': {'proj': {'kernel': n(2, 2, 3, 8), 'bias': n(8)}},
                       'blocks_0': {'norm1': {'scale': 1 + n(8), 'bias': n(8)},
                                    'attn': {'qkv': {'kernel': n(8, 24), 'bias': n(24)}},
                                    'ls1': {'gamma': 0.1 + n(8)}},
                       'blocks_1': {'mlp': {'fc1': {'kernel': n(8, 16), 'bias': n(16)}}},
                       'norm': {'scale': 1 + n(8), 'bias': n(8)}},
          # zero-initialised head: ||p|| = 0 at the first LAMB step (trust ratio 1)
          'head': {'kernel': np.zeros((8, 10), np.float32), 'bias': np.zeros(10, np.float32)}}


TABLE = (optim.ParamGroup(r'kernel$', lr_mult=0.5),
         optim.ParamGroup(r'^backbone/', lr_mult=0.1, frozen_steps=3),
         optim.ParamGroup(r'patch_embed', lr_mult=2.0, wd_mult=0.5, frozen_steps=7),
         optim.ParamGroup(r'(^|/)bias$|scale$', wd_mult=0.0),
         optim.ParamGroup(r'^head/', wd_mult=3.0))


def test_table_rows_multiply_and_frozen_steps_is_the_max():
  # layer decay 0.5 over depth 2: tokens / patch embed 0.5**3, block i 0.5**(2 - i), rest 1
  expected = {  # path: (lr_mult, wd_mult, frozen_steps), worked out by hand
      'backbone/cls_token': (0.125 * 0.1, 1.0, 3),
      'backbone/pos_embed': (0.125 * 0.1, 1.0, 3),
      'backbone/patch_embed/proj/kernel': (0.125 * 0.5 * 0.1 * 2.0, 0.5, 7),
      'backbone/patch_embed/proj/bias': (0.125 * 0.1 * 2.0, 0.0, 7),
      'backbone/blocks_0/norm1/scale': (0.25 * 0.1, 0.0, 3),
      'backbone/blocks_0/norm1/bias': (0.25 * 0.1, 0.0, 3),
      'backbone/blocks_0/attn/qkv/kernel': (0.25 * 0.5 * 0.1, 1.0, 3),
      'backbone/blocks_0/attn/qkv/bias': (0.25 * 0.1, 0.0, 3),
      'backbone/blocks_0/ls1/gamma': (0.25 * 0.1, 1.0, 3),
      'backbone/blocks_1/mlp/fc1/kernel': (0.5 * 0.5 * 0.1, 1.0, 3),
      'backbone/blocks_1/mlp/fc1/bias': (0.5 * 0.1, 0.0, 3),
      'backbone/norm/scale': (0.1, 0.0, 3),
      'backbone/norm/bias': (0.1, 0.0, 3),
      'head/kernel': (0.5, 3.0, 0),
      'head/bias': (1.0, 0.0, 0)}
  tree = _tiny_tree()
  got = [{'/'.join(p): v for p, v in _leaves(t).items()}
         for t in optim.table_multipliers(tree, TABLE, layerwise_decay=0.5)]
  assert set(got[0]) == set(expected)
  for path, (lr, wd, frozen) in expected.items():
    assert got[0][path] == pytest.approx(lr, rel=1e-12), path
    assert (got[1][path], got[2][path]) == (wd, frozen), path
  # without layer decay only the rows act, and no backbone subtree is needed
  lr = {'/'.join(p): v for p, v in _leaves(optim.table_multipliers(tree['backbone'], TABLE)[0]).items()}
  assert lr['patch_embed/proj/kernel'] == pytest.approx(0.5 * 2.0) and lr['norm/scale'] == 1.0
  # no rows: multipliers 1, never frozen
  assert optim.group_multipliers('anything/kernel', ()) == (1.0, 1.0, 0)
  assert optim.group_multipliers('backbone/patch_embed/proj/kernel', TABLE) == pytest.approx(
      (0.5 * 0.1 * 2.0, 0.5, 7))


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return np.asarray(tree)


def _jit_step(tx):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def test_frozen_rows_hold_params_while_moments_accumulate():
  tree = jax.tree.map(jnp.asarray, _tiny_tree())
  tx = optim.build_optimizer(optim.OptimizerSpec(learning_rate=1e-2, weight_decay=0.05,
                                                 groups=TABLE, layerwise_decay=0.5))
  state = tx.init(tree)
  step = _jit_step(tx)
  grads = jax.tree.map(jnp.ones_like, tree)
  history = [tree]
  for _ in range(8):
    tree, state = step(tree, state, grads)
    history.append(tree)
  moved = lambda t, *keys: not np.array_equal(_get(history[t], keys), _get(history[0], keys))
  pe = ('backbone', 'patch_embed', 'proj', 'kernel')
  assert not moved(7, *pe) and moved(8, *pe)  # frozen 7 steps (max of 3 and 7)
  assert not moved(3, 'backbone', 'cls_token') and moved(4, 'backbone', 'cls_token')
  assert moved(1, 'head', 'kernel')
  np.testing.assert_allclose(_get(state[0].mu, pe), 1 - 0.9 ** 8, rtol=1e-6)  # moments kept going


def test_dinov2_table_is_todays_rules():
  """The DINOv2 rows reproduce the hand-written rules on every student leaf."""
  shapes = _student_shapes(scan_blocks=False)
  table = dinov2_optim.dinov2_groups(patch_embed_lr_mult=0.2, freeze_last_layer_steps=5)
  for path, _ in _leaves(shapes).items():
    lr, wd, frozen = optim.group_multipliers('/'.join(path), table)
    # layer decay 1: the reference's lr multiplier is the patch embed's alone
    exp_lr, exp_wd, exp_last = _reference_rules(path[0], _torch_name(path[1:]), 3, 1.0, 0.2)
    assert (lr, wd, frozen) == (exp_lr, exp_wd, 5 if exp_last else 0), path


def test_deit3_table_decays_only_matrices_not_tokens():
  """timm's rule (no decay on 1-D params and on pos_embed / cls_token), on our names."""
  vit = get_arch('vits14_reg', depth=2, img_size=28, embed_dim=32, num_heads=2)
  key = jax.random.key(0)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: {
      'backbone': vit.init(key, jnp.zeros((1, 28, 28, 3)))['params'],
      'head': nn.Dense(10).init(key, jnp.zeros((1, 32)))['params']}))
  leaves = _leaves(shapes)
  wd = _leaves(optim.table_multipliers(shapes, deit3.deit3_groups())[1])
  tokens = ('pos_embed', 'cls_token', 'register_tokens', 'mask_token')
  assert {p[-1] for p in leaves} >= set(tokens) | {'bias', 'scale', 'gamma', 'kernel'}
  for path, leaf in leaves.items():
    torch_1d = path[-1] in ('bias', 'scale', 'gamma')  # 1-D in torch (our qkv bias is not 1-D)
    if path[-1] in ('scale', 'gamma'):
      assert leaf.ndim == 1, path
    assert wd[path] == (0.0 if torch_1d or path[-1] in tokens else 1.0), path


def test_invalid_settings_name_the_value_and_the_choices():
  with pytest.raises(ValueError, match=r"kind='adam'; valid: 'adamw', 'lamb'"):
    optim.OptimizerSpec(learning_rate=1.0, kind='adam')
  with pytest.raises(ValueError, match=r"clip_by='layer'; valid: 'submodule', 'global'"):
    optim.OptimizerSpec(learning_rate=1.0, clip_by='layer')
  with pytest.raises(ValueError, match=r"layerwise_decay=1.5 must lie in \(0, 1\]"):
    optim.OptimizerSpec(learning_rate=1.0, layerwise_decay=1.5)
  with pytest.raises(ValueError, match=r"pattern '\(bias' is not a valid regex"):
    optim.ParamGroup('(bias')
  with pytest.raises(ValueError, match=r"lr_mult=-1 must be a finite number >= 0"):
    optim.ParamGroup('bias', lr_mult=-1)
  with pytest.raises(ValueError, match=r"frozen_steps=1.5 must be an int >= 0"):
    optim.ParamGroup('bias', frozen_steps=1.5)
  with pytest.raises(ValueError, match='OptimizerSpec'):
    optim.build_optimizer({'kind': 'lamb'})


# ---------------------------------------------------------------------------
# LAMB (apex FusedLAMB semantics) against timm.optim.Lamb, a NumPy formula,
# and scanned vs unrolled blocks.

LAMB_LRS = [4e-3, 3e-3, 2e-3, 1e-3, 5e-4, 2e-4]
LAMB_WDS = [0.05, 0.05, 0.0, 0.05, 0.1, 0.05]   # wd 0 at step 2: no trust ratio anywhere
LAMB_GRAD_SCALE = [1.0, 1e-3, 1.0, 0.01, 2.0, 0.003]  # global norm ~20-40 (clipped) or < 1
LAMB_TABLE = deit3.deit3_groups() + (optim.ParamGroup(r'^head/', lr_mult=0.5),
                                     optim.ParamGroup(r'patch_embed', lr_mult=0.1, frozen_steps=2))


def _lamb_spec(groups=LAMB_TABLE, **kw):
  return optim.OptimizerSpec(learning_rate=lambda t: jnp.asarray(LAMB_LRS, jnp.float32)[t],
                             weight_decay=lambda t: jnp.asarray(LAMB_WDS, jnp.float32)[t],
                             groups=groups, kind='lamb', clip_grad=1.0, clip_by='global',
                             clip_eps=0.0, **kw)


def _lamb_grads(params, step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: (rng.normal(size=p.shape) * LAMB_GRAD_SCALE[step]).astype(np.float32),
                      params)


def _optax_updates(spec, params, n_steps):
  """Per-step updates (float64 copies) from our optimiser on its own trajectory."""
  tx = optim.build_optimizer(spec)
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step_fn(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  out = []
  for step in range(n_steps):
    params, state, updates = step_fn(params, state, _lamb_grads(params, step))
    out.append([np.asarray(u, np.float64) for u in jax.tree.leaves(updates)])
  return out


def _timm_lamb_deltas(params, n_steps):
  """timm's Lamb (apex FusedLAMB's algorithm) in float64, one param group per leaf."""
  from timm.optim import Lamb
  tps, groups = [], []
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    lr_mult, wd_mult, frozen = optim.group_multipliers('/'.join(optim.dict_path(path)), LAMB_TABLE)
    tp = torch.nn.Parameter(torch.tensor(np.asarray(value), dtype=torch.float64))
    tps.append(tp)
    groups.append(dict(params=[tp], lr_mult=lr_mult, wd_mult=wd_mult, frozen=frozen))
  # timm defaults: always_adapt=False (trust ratio only where weight_decay != 0, apex's
  # use_nvlamb=False), decoupled_decay=False (apex adam_w_mode: wd * p added to the Adam
  # direction), trust_clip=False; max_grad_norm=1.0 clips by the norm over all groups.
  opt = Lamb(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
             foreach=False)
  out = []
  for step in range(n_steps):
    for g in opt.param_groups:
      g['lr'] = 0.0 if step < g['frozen'] else LAMB_LRS[step] * g['lr_mult']
      g['weight_decay'] = LAMB_WDS[step] * g['wd_mult']
    for tp, grad in zip(tps, jax.tree.leaves(_lamb_grads(params, step))):
      tp.grad = torch.tensor(grad, dtype=torch.float64)
    before = [tp.detach().clone() for tp in tps]
    opt.step()
    out.append([(tp.detach() - b).numpy() for tp, b in zip(tps, before)])
  return out


def test_lamb_matches_timm_lamb(one_torch_thread):
  """Each step's update, per parameter, to 1e-6 of that update's largest entry.

  Compared per step (not on the params) so that float32 storage of ``p``
  (spacing ~6e-8 near 1) does not mask the update; timm runs in float64.
  Measured worst: 4.9e-7. With float32 bias corrections (``optax.scale_by_adam``)
  it is 1.0e-5, with apex's float32-rounded betas 6.9e-6.
  """
  params = _tiny_tree()
  n_steps = len(LAMB_LRS)
  expected = _timm_lamb_deltas(params, n_steps)
  got = _optax_updates(_lamb_spec(), params, n_steps)
  names = ['/'.join(optim.dict_path(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for step in range(n_steps):
    for name, a, b in zip(names, got[step], expected[step]):
      scale = np.abs(b).max()
      if step < 2 and 'patch_embed' in name:
        assert scale == 0 and not a.any(), (step, name)  # frozen
        continue
      assert scale > 0, (step, name)
      assert np.abs(a - b).max() <= 1e-6 * scale, (step, name, np.abs(a - b).max() / scale)


def test_lamb_first_step_numpy_formula():
  """Step 1 written out: clip, Adam (m_hat = g, v_hat = g**2), wd, trust ratio per tensor."""
  params = _tiny_tree()
  params['backbone']['blocks_0']['attn']['qkv']['kernel'] *= 50  # a large ||p||: ratio >> 1
  got = _optax_updates(_lamb_spec(groups=deit3.deit3_groups()), params, 1)[0]
  lr, wd = LAMB_LRS[0], LAMB_WDS[0]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  grads = [np.float64(g) for g in jax.tree.leaves(_lamb_grads(params, 0))]
  norm = np.sqrt(sum(np.sum(g * g) for g in grads))
  assert norm > 1  # the global clip acts
  ratios = []
  for (path, p), g, a in zip(flat, grads, got):
    g = g / max(1.0, norm / 1.0)
    m_hat, v_hat = (0.1 * g) / (1 - 0.9), (0.001 * g * g) / (1 - 0.999)
    u = m_hat / (np.sqrt(v_hat) + 1e-8)
    _, wd_mult, _ = optim.group_multipliers('/'.join(optim.dict_path(path)), deit3.deit3_groups())
    p = np.float64(p)
    if wd_mult:
      u = u + wd * p
      p_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
      ratio = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
      ratios.append(ratio)
    else:
      ratio = 1.0
    expected = -lr * ratio * u
    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6 * np.abs(expected).max(),
                               err_msg='/'.join(optim.dict_path(path)))
  assert min(ratios) < 0.1 and max(ratios) > 1 and 1.0 in ratios  # small, large, zero head


def test_lamb_scanned_equals_unscanned_per_layer_trust_ratio():
  """Scanned blocks get one trust ratio per layer slice: equal to unrolled blocks.

  The blocks' weights are scaled by 1, 10, 100 per layer so that a ratio over
  the stacked tensor would differ by orders of magnitude.
  """
  params = _small_student()
  for i in range(3):
    params['backbone'][f'blocks_{i}'] = jax.tree.map(lambda x, s=10.0 ** i: x * s,
                                                     params['backbone'][f'blocks_{i}'])
  spec = optim.OptimizerSpec(learning_rate=1e-2, weight_decay=0.05, groups=deit3.deit3_groups(),
                             kind='lamb', clip_grad=1.0, clip_by='global', clip_eps=0.0,
                             layerwise_decay=0.9)
  tx = optim.build_optimizer(spec)

  def run(to_tree, from_tree):
    p = to_tree(params)
    state = tx.init(p)
    step = _jit_step(tx)
    for t in range(3):
      p, state = step(p, state, to_tree(_random_grads(from_tree(p), t)))
    return from_tree(p)

  flat = run(lambda t: t, lambda t: t)
  scanned = run(_scan, _unscan)
  for (path, a), b, p0 in zip(jax.tree_util.tree_flatten_with_path(flat)[0], jax.tree.leaves(scanned),
                              jax.tree.leaves(params)):
    a = np.asarray(a)
    update = np.abs(a - np.asarray(p0)).max()
    assert update > 0, path
    # 1e-6 of the total update, plus float32 storage of the params (a few spacings)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * update + 4 * np.spacing(np.abs(a).max()),
                               err_msg='/'.join(optim.dict_path(path)))


def test_deit3_spec_is_apex_fused_lamb():
  spec = deit3.lamb_spec(learning_rate=4e-3)
  assert (spec.kind, spec.b1, spec.b2, spec.eps, spec.weight_decay) == ('lamb', 0.9, 0.999, 1e-8, 0.05)
  assert (spec.clip_grad, spec.clip_by, spec.clip_eps, spec.layerwise_decay) == (1.0, 'global', 0.0, None)
  assert spec.groups == deit3.deit3_groups()
  # apex's clip: g / (norm / max) when norm > max, untouched below
  grads = {'a': jnp.full((4,), 3.0), 'b': jnp.full((4,), 4.0)}  # global norm 10
  clipped, _ = optim.clip_by_global_norm(1.0, eps=0.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(clipped['a'], 0.3, rtol=1e-7)
  small, _ = optim.clip_by_global_norm(100.0, eps=0.0).update(grads, optax.EmptyState())
  np.testing.assert_array_equal(small['b'], grads['b'])
