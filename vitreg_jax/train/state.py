"""The train state every recipe uses, and its sharded initialisation.

``TrainState`` is plain data (no apply_fn / optimizer inside, those live on
the recipe), so it can be checkpointed, ``eval_shape``d and sharded as a pytree.

Sharding comes from the logical names the init function leaves on its
parameters (flax ``LogicallyPartitioned`` boxes). Optimizer moments and other
params-shaped state (an EMA teacher built from the unboxed params) carry no
names of their own; they inherit the spec of the parameter whose tree path
they end with and whose shape they share. Everything else (step counters,
scalars, DINO centres unless boxed) is replicated.

Init never materialises the full state on one device: the init function is
``eval_shape``d to get shapes and names, then jitted with ``out_shardings``,
so each device computes only its own shards.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vitreg_jax.parallel import rules as rules_lib


@flax.struct.dataclass
class TrainState:
  """``step``; ``params``; ``opt_state``; ``extras``: recipe state (EMA teacher, centres ...)."""
  step: jax.Array
  params: Any
  opt_state: Any
  extras: dict[str, Any] = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, params, opt_state, **extras) -> 'TrainState':
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, extras=extras)


def _key_name(key) -> Any:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _path(path) -> tuple:
  return tuple(_key_name(k) for k in path)


def unbox(tree: Any) -> Any:
  """Drops the logical-name boxes without applying any sharding constraint."""
  return jax.tree.map(lambda x: x.value if rules_lib.is_boxed(x) else x, tree,
                      is_leaf=rules_lib.is_boxed)


def state_specs(abstract_state: Any, mesh: Mesh, rules: rules_lib.Rules) -> Any:
  """``PartitionSpec`` tree (unboxed structure) for an abstract, boxed state."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=rules_lib.is_boxed)
  specs = [rules_lib.leaf_spec(leaf, rules, mesh, jax.tree_util.keystr(path))
           if rules_lib.is_boxed(leaf) else None for path, leaf in leaves]
  named = {}  # path below the top-level field -> (shape, spec) of each named leaf
  for (path, leaf), spec in zip(leaves, specs):
    if spec is not None:
      named[_path(path)[1:]] = (tuple(leaf.value.shape), spec)
  for i, (path, leaf) in enumerate(leaves):
    if specs[i] is not None:
      continue
    keys, shape = _path(path), tuple(getattr(leaf, 'shape', ()))
    specs[i] = PartitionSpec()
    for start in range(1, len(keys)):
      match = named.get(keys[start:])
      if match is not None and match[0] == shape:
        specs[i] = match[1]
        break
  return jax.tree_util.tree_unflatten(treedef, specs)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: rules_lib.Rules) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(abstract_state, mesh, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: rules_lib.Rules, shardings: Any = None) -> tuple[Any, Any]:
  """Runs ``init_fn(rng)`` with every leaf born on its own shards.

  Returns ``(state, shardings)``; the state is unboxed. ``shardings`` may be
  passed when already known (they are otherwise derived via ``eval_shape``).
  """
  if shardings is None:
    shardings = state_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
  state = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings)(rng)
  return state, shardings
