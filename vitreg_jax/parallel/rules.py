"""Logical axis rules: how named array axes map onto the mesh, per strategy.

Every parameter and key activation carries logical names (``embed``, ``mlp``,
``heads`` ...). A strategy is nothing but a rule table from those names to
mesh axes, chosen by ``config.sharding.strategy``:

* ``dp``: parameters and optimizer state replicated; batch over data x fsdp.
* ``fsdp``: parameters and optimizer state sharded over ``fsdp`` (ZeRO-3
  style: gathered per layer by XLA); batch over data x fsdp.
* ``fsdp_tp``: fsdp plus Megatron-style tensor parallelism: ``heads``,
  ``mlp``, ``classes`` over ``tensor``; the very wide ``prototypes`` (DINO
  head, 65k-131k) and ``vocab`` (CLIP) over fsdp x tensor.

Rules are tried in order and a mesh axis is used at most once per array
(flax semantics), so ``batch`` comes first: in an activation
``[batch, tokens, embed]`` batch takes ``fsdp`` and ``embed`` stays whole,
while in a parameter ``[embed, mlp]`` (no batch axis) ``embed`` takes it.

A dimension that its mesh axes do not divide is not sharded (jax requires
even shards); the freed mesh axis then goes to another dimension of the same
array whose name has a rule for it. E.g. ViT-S ``fc1 [embed=384, mlp=1536]``
on fsdp=256 shards ``mlp`` instead of ``embed``.
"""

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ('batch', 'tokens', 'embed', 'mlp', 'heads', 'head_dim', 'layers', 'patch',
                'prototypes', 'vocab', 'classes')
BATCH_MESH_AXES = ('data', 'fsdp')

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

STRATEGIES: dict[str, Rules] = {
    'dp': (
        ('batch', BATCH_MESH_AXES),
    ),
    'fsdp': (
        ('batch', BATCH_MESH_AXES),
        ('prototypes', 'fsdp'),
        ('vocab', 'fsdp'),
        ('embed', 'fsdp'),
        ('mlp', 'fsdp'),
        ('classes', 'fsdp'),
    ),
    'fsdp_tp': (
        ('batch', BATCH_MESH_AXES),
        ('prototypes', ('fsdp', 'tensor')),
        ('prototypes', 'tensor'),
        ('vocab', ('fsdp', 'tensor')),
        ('vocab', 'tensor'),
        ('heads', 'tensor'),
        ('mlp', 'tensor'),
        ('classes', 'tensor'),
        ('embed', 'fsdp'),
        ('mlp', 'fsdp'),
    ),
}


def get_rules(strategy: str) -> Rules:
  if strategy not in STRATEGIES:
    raise ValueError(f'unknown sharding strategy {strategy!r}; valid: {sorted(STRATEGIES)}')
  return STRATEGIES[strategy]


def validate_strategy(strategy: str, mesh: Mesh) -> None:
  """Fails when the mesh has an axis the strategy would leave idle (duplicated work)."""
  get_rules(strategy)
  if strategy != 'fsdp_tp' and mesh.shape['tensor'] > 1:
    raise ValueError(
        f"strategy {strategy!r} does not use the mesh's tensor axis (size "
        f"{mesh.shape['tensor']}): set config.mesh.tensor=1 or config.sharding.strategy='fsdp_tp'")


def rules_from_config(sharding_config, mesh: Mesh) -> Rules:
  """``sharding.rules`` when given (pairs of logical name -> mesh axes), else the strategy's.

  The override serves experiments with a layout the strategies do not offer;
  its logical names are checked, its mesh axes must exist.
  """
  strategy = sharding_config['strategy']
  validate_strategy(strategy, mesh)
  override = sharding_config.get('rules')
  if not override:
    return get_rules(strategy)
  rules = []
  for pair in override:
    if len(pair) != 2:
      raise ValueError(f'sharding.rules entry {pair!r}: expected (logical name, mesh axes)')
    name, axes = pair
    check_names((name,), 'sharding.rules')
    axes = _as_tuple(axes) if axes is not None else ()
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
      raise ValueError(f'sharding.rules maps {name!r} to {missing}; mesh axes: {mesh.axis_names}')
    rules.append((name, _from_tuple(axes) if axes else None))
  return tuple(rules)


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _from_tuple(axes: tuple[str, ...]):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def check_names(names: Sequence[str | None], where: str = '') -> None:
  unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f'{where or "array"} has unknown logical axis names {unknown}; '
                     f'known: {list(LOGICAL_AXES)}')


def partition_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                   mesh: Mesh, where: str = '') -> PartitionSpec:
  """Mesh ``PartitionSpec`` for an array with logical ``names`` and ``shape``."""
  if len(names) != len(shape):
    raise ValueError(f'{where or "array"}: logical names {tuple(names)} do not match '
                     f'shape {tuple(shape)}')
  check_names(names, where)
  sizes = dict(mesh.shape)
  spec = [_as_tuple(a) for a in nn.logical_to_mesh_axes(names, rules)]
  spec += [()] * (len(shape) - len(spec))
  freed = []
  for dim, axes in enumerate(spec):
    kept = axes
    while kept and shape[dim] % math.prod(sizes[a] for a in kept):
      kept = kept[:-1]
    spec[dim] = kept
    freed += [a for a in axes if a not in kept]
  for axis in freed:
    used = {a for axes in spec for a in axes}
    for name, target in rules:
      if axis in used or _as_tuple(target) != (axis,) or name not in names:
        continue
      dim = list(names).index(name)
      if not spec[dim] and shape[dim] % sizes[axis] == 0:
        spec[dim] = (axis,)
        used.add(axis)
  return PartitionSpec(*[_from_tuple(axes) for axes in spec])


def is_boxed(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def leaf_spec(leaf: Any, rules: Rules, mesh: Mesh, where: str = '') -> PartitionSpec:
  """Spec of a ``LogicallyPartitioned`` leaf; plain leaves are replicated."""
  if is_boxed(leaf):
    return partition_spec(leaf.names, leaf.value.shape, rules, mesh, where)
  return PartitionSpec()


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh) -> Any:
  """``NamedSharding`` per leaf of a (possibly boxed, possibly abstract) tree.

  The result has the structure of the *unboxed* tree.
  """
  def one(path, leaf):
    return NamedSharding(mesh, leaf_spec(leaf, rules, mesh, jax.tree_util.keystr(path)))
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_boxed)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                     mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, partition_spec(names, shape, rules, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins ``x``'s sharding by logical ``names`` under the active rules (``activate``).

  Like ``nn.with_logical_constraint``, but a mesh axis that does not divide its
  dimension is dropped (see ``partition_spec``) instead of making XLA pad.
  Outside ``activate`` (no mesh) it returns ``x`` unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  return jax.lax.with_sharding_constraint(x, partition_spec(names, x.shape, rules, mesh))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes flax's logical constraints live; usable inside a jit trace.

  ``nn.with_logical_constraint`` is a no-op unless a mesh is in context; the
  abstract mesh is enough (and, unlike ``jax.set_mesh``, allowed under jit).
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield
