"""Reading and writing flat tensor files, and writing them only when complete.

* safetensors are read and written with numpy (no torch needed; bfloat16
  through ml_dtypes).
* ``.pth``/``.pt``/``.bin`` pickles are read only with
  ``torch.load(weights_only=True)``: a pickle that would run code is refused.
  Nested dicts (training checkpoints) are flattened with ``.``.
* Outputs go to a temporary sibling first and are renamed into place, so a
  failed conversion leaves the destination untouched.
"""

import contextlib
import json
import logging
import os
import pickle
import shutil
import tempfile

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from vitreg_jax.convert.checks import ConversionError

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
logger = logging.getLogger('vitreg_jax.convert')


def read_safetensors(path: str) -> dict:
  with safe_open(path, framework='np') as f:
    return {name: f.get_tensor(name) for name in f.keys()}


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError(
        f'{path}: reading torch pickles needs torch (pip install "vitreg_jax[torch]"); '
        'safetensors files do not') from None
  return torch


def _flatten_state(torch, tree, prefix: str, out: dict, skipped: list) -> None:
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      _flatten_state(torch, value, name + '.', out, skipped)
    elif isinstance(value, torch.Tensor):
      t = value.detach().cpu()
      out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    else:
      skipped.append(name)


def read_torch(path: str) -> dict:
  """Tensors of a torch checkpoint, loaded without running any pickled code."""
  torch = _import_torch(path)
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    reason = str(e).strip().splitlines()
    raise ConversionError(
        f'{path}: refused: this pickle needs more than tensors and plain containers to load, '
        'i.e. it would run code (torch.load(weights_only=True) rejected it: '
        f'{reason[-1] if reason else type(e).__name__}). Re-save it as a plain state dict '
        'or safetensors from a trusted environment.') from None
  if not isinstance(state, dict):
    raise ConversionError(f'{path}: expected a dict of tensors, found {type(state).__name__}')
  out, skipped = {}, []
  _flatten_state(torch, state, '', out, skipped)
  if skipped:
    logger.info('%s: ignored non-tensor entries %s', path, skipped[:8])
  return out


def read_tensors(path: str) -> dict:
  """Flat ``{name: np.ndarray}`` from a ``.safetensors`` or torch file."""
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return read_torch(path)
  raise ConversionError(
      f'{path}: unknown tensor file type; expected .safetensors or one of {TORCH_SUFFIXES}')


def read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f'{path}: not valid JSON ({e})') from None


def write_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def write_torch(tensors: dict, path: str) -> None:
  torch = _import_torch(path)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)


def write_tensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
  """By suffix: safetensors (no torch needed; with ``metadata``) or a torch state dict."""
  if path.endswith('.safetensors'):
    write_safetensors(tensors, path, metadata)
  elif path.endswith(TORCH_SUFFIXES):
    write_torch(tensors, path)
  else:
    raise ConversionError(
        f'{path}: unknown tensor file type; expected .safetensors or one of {TORCH_SUFFIXES}')


def write_json(obj: dict, path: str) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


@contextlib.contextmanager
def atomic_file(dest: str):
  """Yields a temporary path next to ``dest`` (same suffix); renamed onto ``dest`` on success."""
  parent = os.path.dirname(os.path.abspath(dest))
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(dest)}.',
                             suffix='.tmp' + os.path.splitext(dest)[1], dir=parent)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(dest: str):
  """Yields a temporary folder next to ``dest``; its files land in ``dest`` on success.

  A new ``dest`` is created by one rename; into an existing folder each file is
  moved by ``os.replace``, leaving other files there alone.
  """
  if os.path.exists(dest) and not os.path.isdir(dest):
    raise ConversionError(f'{dest}: exists and is not a folder')
  parent = os.path.dirname(os.path.abspath(dest))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(dest))}.', suffix='.tmp',
                         dir=parent)
  try:
    yield tmp
    if not os.path.exists(dest):
      os.rename(tmp, dest)
    else:
      for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(dest, name))
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
