"""The small argument string of config files: ``configs/x.py:preset,key=value,...``.

Presets are applied first (in the order given), then ``key=value`` settings,
each a short alias for a dotted config path. Anything unknown fails with the
valid choices listed, so a typo never trains the wrong model for a week.
"""

from typing import Any, Callable, Mapping

import ml_collections

Preset = Callable[[ml_collections.ConfigDict], None]


def _cast(value: str, current: Any, key: str):
  if isinstance(current, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{key}={value!r}: expected true or false')
    return value.lower() in ('true', '1')
  if isinstance(current, int) and not isinstance(current, bool):
    return int(value)
  if isinstance(current, float):
    return float(value)
  return value


def apply_arg(config: ml_collections.ConfigDict, arg: str | None,
              presets: Mapping[str, Preset], keys: Mapping[str, str | Callable]) -> None:
  """Applies ``arg`` to ``config`` in place.

  ``keys`` maps an alias to a dotted path (the value is cast to the current
  type) or to a function ``(config, value_string)`` for keys that set several
  fields at once.
  """
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  for token in tokens:
    if '=' in token:
      continue
    if token not in presets:
      raise ValueError(f'unknown preset {token!r}; presets: {sorted(presets)}, '
                       f'keys: {sorted(keys)}')
    presets[token](config)
  for token in tokens:
    if '=' not in token:
      continue
    key, value = (s.strip() for s in token.split('=', 1))
    if key not in keys:
      raise ValueError(f'unknown config key {key!r}; valid keys: {sorted(keys)}')
    target = keys[key]
    if callable(target):
      target(config, value)
      continue
    *parents, leaf = target.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = _cast(value, node[leaf], key)
