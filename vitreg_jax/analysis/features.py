"""The one feature pass: a network over evaluation batches -> the outputs asked for.

Every evaluator and analysis (kNN, probes, norms, attention maps, LOST,
zero-shot) reads features through here, so the forward pass is written once
and compiled once per (network, input shape):

  features = FeaturePass(model, outputs=('cls', 'patch_norms'), mesh=mesh, rules=rules)
  arrays = features.over(variables, eval_batches)    # {'cls': [N, D], ..., 'label': [N]}

``outputs`` name entries of the model's output dict (``cls``, ``registers``,
``patches``, ``prenorm``, ``logits`` ...), the per-layer ``layers`` /
``attention`` (the model's ``return_*`` switches), the internals the model
``sow``s (``q``, ``k``, ``v`` of block ``block``, default the last;
``patch_embed``) and reductions computed on the device, so that the host
never holds more than it needs (the analyses of a ViT-g would otherwise pull
gigabytes of per-layer tokens or attention per batch):

  patch_norms [B, N]        L2 norms of the output patch tokens (after the final norm)
  prenorm_norms [B, T]      ... of every token before the final norm
  layer_norms [L, B, T]     ... of every block's output tokens (before the final norm)
  layer_normed_norms [L, B, T]  the same after the final norm
  cls_layers [L, B, D]      every block's cls token after the final norm (linear probes)
  patch_mean [B, D]         mean of the output patch tokens (registers excluded)
  prefix_attention [B, H, P, N]  last-block attention of cls and registers over the patches
  patch_neighbour_cos [B, N]     mean cosine of each patch embedding (after the patch
                                 projection) with its 4 grid neighbours (paper Fig. 5a)

Batches are global arrays sharded over the mesh like training batches;
results are gathered across hosts and padding (``valid == 0``) is dropped.
``stream`` yields them batch by batch (with a progress line), ``over``
concatenates the stream.
"""

import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from vitreg_jax.analysis import norms
from vitreg_jax.models import vit
from vitreg_jax.parallel import rules as rules_lib

SWITCHES = {'layers': 'return_layers', 'layers_normed': 'return_layers',
            'attention': 'return_attention'}
INTERNALS = ('q', 'k', 'v', 'patch_embed')


def _prefix_attention(model, out, images):
  """Last block: rows of cls + registers, columns of the patches."""
  p = model.num_prefix_tokens
  return out['attention'][-1][:, :, :p, p:]


def neighbour_cosine(tokens, grid: tuple[int, int]):
  """Mean cosine of each token ``[B, gh * gw, D]`` with its (up to) 4 grid neighbours."""
  b, _, d = tokens.shape
  gh, gw = grid
  unit = tokens.astype(jnp.float32)
  unit = unit / jnp.maximum(jnp.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
  unit = unit.reshape(b, gh, gw, d)
  padded = jnp.pad(unit, ((0, 0), (1, 1), (1, 1), (0, 0)))
  total = sum((unit * padded[:, 1 + dy:1 + dy + gh, 1 + dx:1 + dx + gw]).sum(-1)
              for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
  rows, cols = np.arange(gh)[:, None], np.arange(gw)[None, :]
  count = ((rows > 0).astype(np.float32) + (rows < gh - 1) + (cols > 0) + (cols < gw - 1))
  return (total / np.maximum(count, 1)).reshape(b, gh * gw)


def _patch_neighbour_cos(model, out, images):
  p = model.patch_size
  return neighbour_cosine(out['patch_embed'], (images.shape[1] // p, images.shape[2] // p))


# name -> (model outputs it needs, function(model, outputs, images))
DERIVED = {
    'patch_norms': (('patches',), lambda m, o, x: norms.token_norms(o['patches'])),
    'prenorm_norms': (('prenorm',), lambda m, o, x: norms.token_norms(o['prenorm'])),
    'layer_norms': (('layers',), lambda m, o, x: norms.token_norms(o['layers'])),
    'layer_normed_norms': (('layers_normed',),
                           lambda m, o, x: norms.token_norms(o['layers_normed'])),
    'cls_layers': (('layers_normed',), lambda m, o, x: o['layers_normed'][:, :, 0]),
    'patch_mean': (('patches',), lambda m, o, x: o['patches'].mean(axis=1)),
    'prefix_attention': (('attention',), _prefix_attention),
    'patch_neighbour_cos': (('patch_embed',), _patch_neighbour_cos),
}
LAYERS_FIRST = ('layers', 'layers_normed', 'attention', 'layer_norms', 'layer_normed_norms',
                'cls_layers')


def _vit_intermediates(tree):
  """The ViT's own ``intermediates`` inside a wrapper's (e.g. ``ViTClassifier.backbone``)."""
  if 'patch_embed_out' in tree:
    return tree
  for child in tree.values():
    if isinstance(child, dict) and (found := _vit_intermediates(child)) is not None:
      return found
  return None


def _sown(tree, name, block: int = -1):
  """``patch_embed`` [B, N, D], or block ``block``'s ``q``/``k``/``v`` [B, T, H, hd]."""
  inter = _vit_intermediates(tree)
  if inter is None:
    raise KeyError(f'the model sows no ViT internals; asked for {name!r} of {INTERNALS}')
  if name == 'patch_embed':
    return inter['patch_embed_out'][-1]
  return vit.block_intermediates(inter, name)[block]


def _progress(done: int, total: int | None, started: float) -> None:
  rate = done / max(time.perf_counter() - started, 1e-9)
  of = f'/{total}' if total else ''
  sys.stderr.write(f'\r  features: {done}{of} images, {rate:.1f} img/s')
  sys.stderr.flush()


class FeaturePass:
  """``model`` evaluated for ``outputs``; one jit per input shape (see the module docstring)."""

  def __init__(self, model, outputs: Sequence[str], mesh=None, rules: Any = None,
               method=None, block: int = -1):
    """``method``: the model's image entry point when ``__call__`` wants more than images
    (e.g. ``CLIP.encode_image``); ``block``: whose ``q``/``k``/``v`` (negative from the end)."""
    self.model, self.outputs, self.mesh, self.rules = model, tuple(outputs), mesh, rules
    self.block = block
    self._method = {} if method is None else {'method': method}
    needed = set(self.outputs)
    for name in self.outputs:
      needed.update(DERIVED.get(name, ((),))[0])
    self._switches = {SWITCHES[o]: True for o in needed if o in SWITCHES}
    self._internals = [o for o in INTERNALS if o in needed]
    self._jitted = jax.jit(self._forward)

  def _apply(self, variables, images):
    if self._internals:
      out, sown = self.model.apply(variables, images, mutable=['intermediates'],
                                   **self._switches, **self._method)
      out = dict(out)
      for name in self._internals:
        out[name] = _sown(sown['intermediates'], name, self.block)
      return out
    return self.model.apply(variables, images, **self._switches, **self._method)

  def _forward(self, variables, images):
    if self.mesh is not None:
      with rules_lib.activate(self.mesh, self.rules):
        out = self._apply(variables, images)
    else:
      out = self._apply(variables, images)
    result = {}
    for name in self.outputs:
      if name in DERIVED:
        result[name] = DERIVED[name][1](self.model, out, images)
      elif name not in out:
        raise KeyError(f'the model returns no {name!r}; it returns {sorted(out)}, derived: '
                       f'{sorted(DERIVED)}, internals: {INTERNALS}')
      else:
        result[name] = out[name]
    return result

  def __call__(self, variables, images) -> dict[str, jax.Array]:
    """Global arrays for one batch of images (no gathering)."""
    return self._jitted(variables, images)

  @property
  def compilations(self) -> int:
    """Distinct compiled programs so far (one per input shape)."""
    return self._jitted._cache_size()  # pylint: disable=protected-access

  def stream(self, variables, batches: Iterable[dict], max_examples: int = 0,
             progress: bool = False, keep: Sequence[str] = ('label',)) -> Iterator[dict]:
    """Host arrays batch by batch, padding dropped; ``keep``: batch fields passed through.

    Per-layer outputs keep the layers first (``layers [L, B, T, D]``,
    ``attention [L, B, H, T, T]``, ``layer_norms [L, B, T]``); everything
    else is example-first. ``progress`` writes images and images/s to stderr.
    """
    seen, started = 0, time.perf_counter()
    total = getattr(batches, 'num_examples', None)
    for batch in batches:
      out = self(variables, batch['image'])
      extra = {k: batch[k] for k in (*keep, 'valid') if k in batch}
      host = jax.tree.map(np.asarray, multihost_utils.process_allgather(
          {**out, **extra}, tiled=True))
      valid = host.pop('valid').astype(bool) if 'valid' in host else None
      if valid is not None:
        host = {n: (v[:, valid] if n in LAYERS_FIRST else v[valid]) for n, v in host.items()}
      count = int(valid.sum()) if valid is not None else len(host[self.outputs[0]])
      if max_examples and seen + count > max_examples:
        cut = max_examples - seen
        host = {n: (v[:, :cut] if n in LAYERS_FIRST else v[:cut]) for n, v in host.items()}
        count = cut
      seen += count
      if progress:
        _progress(seen, total, started)
      yield host
      if max_examples and seen >= max_examples:
        break
    if progress:
      sys.stderr.write('\n')

  def over(self, variables, batches: Iterable[dict], max_examples: int = 0,
           progress: bool = False, keep: Sequence[str] = ('label',)) -> dict[str, np.ndarray]:
    """Host arrays over all ``batches`` (``image``, ``valid``, ``label``), padding dropped;
    ``keep``: the batch fields passed through.

    Per-layer outputs keep the layers first: ``layers [L, N, T, D]``,
    ``attention [L, N, H, T, T]``; everything else is example-first.
    """
    parts: dict[str, list] = {}
    for host in self.stream(variables, batches, max_examples, progress, keep):
      for name, value in host.items():
        parts.setdefault(name, []).append(value)
    if not parts:
      raise ValueError('no evaluation batches: the split is empty')
    return {n: np.concatenate(v, axis=1 if n in LAYERS_FIRST else 0) for n, v in parts.items()}


class PassCache:
  """One ``FeaturePass`` per (model, outputs, mesh): evaluators call it every eval."""

  def __init__(self):
    self._passes = {}

  def get(self, model, outputs: Sequence[str], mesh=None, rules: Any = None, method=None,
          block: int = -1) -> FeaturePass:
    key = (id(model), tuple(outputs), id(mesh), block)
    if key not in self._passes:
      self._passes[key] = FeaturePass(model, outputs, mesh, rules, method, block)
    return self._passes[key]
