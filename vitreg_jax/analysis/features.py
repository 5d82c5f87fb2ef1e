"""The one feature pass: a network over evaluation batches -> the outputs asked for.

Every evaluator and analysis (kNN, probes, norms, attention maps, LOST,
zero-shot) reads features through here, so the forward pass is written once
and compiled once per (network, input shape):

  features = FeaturePass(model, outputs=('cls', 'patch_norms'), mesh=mesh, rules=rules)
  arrays = features.over(variables, eval_batches)    # {'cls': [N, D], ..., 'label': [N]}

``outputs`` name entries of the model's output dict (``cls``, ``registers``,
``patches``, ``prenorm``, ``logits`` ...), derived ones (``patch_norms``
[B, N], ``prenorm_norms`` [B, T]), the per-layer ``layers`` / ``attention``
(the model's ``return_*`` switches) and the internals the model ``sow``s
(``q``, ``k``, ``v`` of the last block, ``patch_embed``). Batches are global
arrays sharded over the mesh like training batches; results are gathered
across hosts and padding (``valid == 0``) is dropped.
"""

from typing import Any, Iterable, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from vitreg_jax.analysis import norms
from vitreg_jax.models import vit
from vitreg_jax.parallel import rules as rules_lib

DERIVED = {'patch_norms': 'patches', 'prenorm_norms': 'prenorm'}
SWITCHES = {'layers': 'return_layers', 'layers_normed': 'return_layers',
            'attention': 'return_attention'}
INTERNALS = ('q', 'k', 'v', 'patch_embed')


def _vit_intermediates(tree):
  """The ViT's own ``intermediates`` inside a wrapper's (e.g. ``ViTClassifier.backbone``)."""
  if 'patch_embed_out' in tree:
    return tree
  for child in tree.values():
    if isinstance(child, dict) and (found := _vit_intermediates(child)) is not None:
      return found
  return None


def _sown(tree, name):
  """``patch_embed`` [B, N, D], or the last block's ``q``/``k``/``v`` [B, T, H, hd]."""
  inter = _vit_intermediates(tree)
  if inter is None:
    raise KeyError(f'the model sows no ViT internals; asked for {name!r} of {INTERNALS}')
  if name == 'patch_embed':
    return inter['patch_embed_out'][-1]
  return vit.block_intermediates(inter, name)[-1]


class FeaturePass:
  """``model`` evaluated for ``outputs``; one jit per input shape (see the module docstring)."""

  def __init__(self, model, outputs: Sequence[str], mesh=None, rules: Any = None,
               method=None):
    """``method``: the model's image entry point when ``__call__`` wants more than images
    (e.g. ``CLIP.encode_image``)."""
    self.model, self.outputs, self.mesh, self.rules = model, tuple(outputs), mesh, rules
    self._method = {} if method is None else {'method': method}
    self._switches = {SWITCHES[o]: True for o in self.outputs if o in SWITCHES}
    self._internals = [o for o in self.outputs if o in INTERNALS]
    self._jitted = jax.jit(self._forward)

  def _apply(self, variables, images):
    if self._internals:
      out, sown = self.model.apply(variables, images, mutable=['intermediates'],
                                   **self._switches, **self._method)
      out = dict(out)
      for name in self._internals:
        out[name] = _sown(sown['intermediates'], name)
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
        result[name] = norms.token_norms(out[DERIVED[name]])
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

  def over(self, variables, batches: Iterable[dict], max_examples: int = 0) -> dict[str, np.ndarray]:
    """Host arrays over all ``batches`` (``image``, ``valid``, ``label``), padding dropped.

    Per-layer outputs keep the layers first: ``layers [L, N, T, D]``,
    ``attention [L, N, H, T, T]``; everything else is example-first.
    """
    parts: dict[str, list] = {}
    seen = 0
    for batch in batches:
      out = self(variables, batch['image'])
      extra = {k: batch[k] for k in ('label', 'valid') if k in batch}
      host = jax.tree.map(np.asarray, multihost_utils.process_allgather(
          {**out, **extra}, tiled=True))
      keep = host.pop('valid').astype(bool) if 'valid' in host else None
      for name, value in host.items():
        layers_first = name in SWITCHES
        if keep is not None:
          value = value[:, keep] if layers_first else value[keep]
        parts.setdefault(name, []).append(value)
      seen += int(keep.sum()) if keep is not None else len(host[self.outputs[0]])
      if max_examples and seen >= max_examples:
        break
    if not parts:
      raise ValueError('no evaluation batches: the split is empty')
    result = {n: np.concatenate(v, axis=1 if n in SWITCHES else 0) for n, v in parts.items()}
    if max_examples:
      result = {n: v[:, :max_examples] if n in SWITCHES else v[:max_examples]
                for n, v in result.items()}
    return result
