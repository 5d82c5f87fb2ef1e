"""The one config schema every recipe shares, and the ``:arg`` parser of config files.

A run's config is an ``ml_collections.ConfigDict`` built by ``configs/X.py``'s
``get_config(arg)``. Its shared sections are defined here, once:

* ``recipe``, ``seed``;
* ``data``: source and split (see ``data/sources.py``), ``batch_size`` = the
  *global* batch of every recipe, loader settings;
* ``optim``: epochs x epoch_length = the run's length, lr / weight-decay
  schedule, the optimizer (``adamw`` | ``lamb``), clipping, layer-wise decay;
* ``train``: logging, checkpoint, evaluation cadence, export formats, MFU peak;
* ``eval``: the evaluators' settings (kNN bank, ks ...);
* ``mesh`` (axis sizes), ``sharding`` (strategy and an optional rule
  override), ``distributed`` (multi-process initialisation).

Everything else (``model``, ``augment``, ``dino`` ...) is the recipe's and is
validated by it. The register count lives in ``model.num_registers`` only.

``parse_arg`` applies ``configs/x.py:preset,key=value`` strings. Every
mistake raises ``ConfigError`` with one line naming the key and the valid
choices; ``main`` prints that line without a traceback.
"""

import importlib.util
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections

Preset = Callable[[ml_collections.ConfigDict], None]


class ConfigError(ValueError):
  """A config key or value that cannot work; the message names it and the valid choices."""


DATA = {
    'source': 'embedded', 'name': '', 'split': 'train', 'eval_split': 'val', 'data_dir': None,
    'tfds_image_decoding': 'ours', 'path': '', 'embedded': {},
    'batch_size': 64, 'eval_batch_size': None, 'shuffle': True, 'num_epochs': None,
    'num_workers': 0, 'worker_buffer_size': 2, 'read_threads': 1, 'device_prefetch': 2,
    'batch_axes': ('data', 'fsdp'),
}
OPTIM = {
    'optimizer': 'adamw', 'epochs': 100, 'epoch_length': 1250, 'warmup_epochs': 10,
    'base_lr': 1e-3, 'min_lr': 1e-6, 'warmup_init_lr': 0.0, 'scaling_rule': 'none',
    'weight_decay': 0.05, 'weight_decay_end': None, 'clip_grad': 0.0, 'clip_by': 'global',
    'layerwise_decay': 1.0, 'patch_embed_lr_mult': 1.0, 'freeze_last_layer_epochs': 0,
    'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
}
TRAIN = {
    'log_every': 50, 'checkpoint_every': 1000, 'keep_checkpoints': 3, 'eval_every': 10000,
    'export_formats': ('vitreg',), 'peak_flops_per_device': 197e12,
}
EVAL = {
    'knn_ks': (10, 20, 100, 200), 'knn_temperature': 0.07, 'train_split': 'train',
    'max_train_examples': 0, 'max_eval_examples': 0,
}
MESH = {'data': 1, 'fsdp': -1, 'tensor': 1}
SHARDING = {'strategy': 'fsdp', 'rules': None}
DISTRIBUTED = {'mode': 'auto', 'coordinator_address': '', 'num_processes': 0, 'process_id': -1}
SHARED_SECTIONS = {'data': DATA, 'optim': OPTIM, 'train': TRAIN, 'eval': EVAL, 'mesh': MESH,
                   'sharding': SHARDING, 'distributed': DISTRIBUTED}
TOP_LEVEL = ('recipe', 'seed')


def _field(value):
  """Leaves that may be None or another type later stay assignable in a locked config."""
  if value is None:
    return ml_collections.FieldReference(None, field_type=object)
  return value


def section(name: str, /, **overrides) -> ml_collections.ConfigDict:
  """The shared section ``name`` with its defaults, ``overrides`` applied (checked)."""
  defaults = SHARED_SECTIONS[name]
  check_keys(overrides, defaults, name)
  values = {**defaults, **overrides}
  return ml_collections.ConfigDict({k: _field(v) for k, v in values.items()})


def base_config(recipe: str, **sections: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """``recipe`` + ``seed`` + every shared section (with ``sections`` overriding defaults)."""
  unknown = sorted(set(sections) - set(SHARED_SECTIONS))
  if unknown:
    raise ConfigError(f'unknown shared section(s) {unknown}; valid: {sorted(SHARED_SECTIONS)}')
  c = ml_collections.ConfigDict()
  c.recipe = recipe
  c.seed = 0
  for name in SHARED_SECTIONS:
    c[name] = section(name, **dict(sections.get(name, {})))
  return c


def from_file(path: str | os.PathLike, arg: str | None = None, **kwargs) -> ml_collections.ConfigDict:
  """``get_config(arg, **kwargs)`` of the config file at ``path`` (``configs/`` is no package).

  What ``--config=PATH:ARG`` gives, for scripts, tests and a baseline config
  that reuses its register sibling (``configs/dinov2.py``).
  """
  path = os.fspath(path)
  name = 'vitreg_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg, **kwargs)


def set_registers(c: ml_collections.ConfigDict, value: str) -> None:
  """The ``registers=N`` key of every config file: ``model.num_registers`` (0..64)."""
  registers = int(value)
  if not 0 <= registers <= 64:
    raise ConfigError(f'registers={registers}; expected 0..64')
  c.model.num_registers = registers


def check_keys(given: Mapping[str, Any], valid: Sequence[str] | Mapping[str, Any],
               where: str) -> None:
  """Fails with one line if ``given`` has a key outside ``valid``."""
  unknown = sorted(set(given) - set(valid))
  if unknown:
    raise ConfigError(f'unknown config key {where}.{unknown[0]}; valid keys of {where}: '
                      f'{sorted(valid)}')


def check_choice(value: Any, choices: Sequence[Any], key: str) -> None:
  if value not in choices:
    raise ConfigError(f'{key}={value!r}; valid: {list(choices)}')


def validate_shared(config: ml_collections.ConfigDict, recipe_sections: Sequence[str]) -> None:
  """The shared sections hold only known keys; top-level keys are shared or the recipe's."""
  allowed = set(TOP_LEVEL) | set(SHARED_SECTIONS) | set(recipe_sections)
  check_keys(config, sorted(allowed), 'config')
  for name, defaults in SHARED_SECTIONS.items():
    if name not in config:
      raise ConfigError(f'config has no {name!r} section; build it with vitreg_jax.config.'
                        'base_config')
    check_keys(config[name], defaults, name)


def _cast(value: str, current: Any, key: str):
  try:
    if isinstance(current, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError
      return value.lower() in ('true', '1')
    if isinstance(current, int):
      return int(value)
    if isinstance(current, float):
      return float(value)
  except ValueError:
    raise ConfigError(f'{key}={value!r}: expected a {type(current).__name__}') from None
  return value


def parse_arg(config: ml_collections.ConfigDict, arg: str | None,
              presets: Mapping[str, Preset], keys: Mapping[str, str | Callable],
              first: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Applies ``arg`` (``preset,key=value,...``) to ``config`` in place and returns it.

  Order: the keys named in ``first`` (e.g. a variant that sets a preset's batch
  and lr), then presets in the order given, then the other ``key=value``
  settings. ``keys`` maps an alias to a dotted path (the value is cast to the
  current type) or to a function ``(config, value_string)``.
  """
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  settings = [tuple(s.strip() for s in t.split('=', 1)) for t in tokens if '=' in t]
  for key, _ in settings:
    if key not in keys:
      raise ConfigError(f'unknown config key {key!r}; valid keys: {sorted(keys)}, '
                        f'presets: {sorted(presets)}')
  for token in tokens:
    if '=' not in token and token not in presets:
      raise ConfigError(f'unknown preset {token!r}; presets: {sorted(presets)}, '
                        f'keys: {sorted(keys)}')
  ordered = [s for s in settings if s[0] in first] + [None] + [
      s for s in settings if s[0] not in first]
  for setting in ordered:
    if setting is None:
      for token in tokens:
        if '=' not in token:
          presets[token](config)
      continue
    key, value = setting
    target = keys[key]
    if callable(target):
      try:
        target(config, value)
      except ConfigError:
        raise
      except (ValueError, KeyError) as error:
        raise ConfigError(f'{key}={value!r}: {error}') from None
      continue
    *parents, leaf = target.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = _cast(value, node[leaf], key)
  return config


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = '',
                ignore: Sequence[str] = ()) -> list[str]:
  """``['model.depth: saved 4, now 6', ...]`` between two nested dicts (JSON form)."""
  out = []
  for key in sorted(set(saved) | set(current)):
    path = f'{prefix}{key}'
    if path in ignore:
      continue
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out.extend(differences(a, b, path + '.', ignore))
    elif _normal(a) != _normal(b):
      out.append(f'{path}: saved {a!r}, now {b!r}')
  return out


def _normal(value):
  return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value
