"""Zero-shot top-1 of an image-text model: class prompts -> a text classifier -> top-1.

CLIP's protocol (REFERENCE §4): every class name is put into every prompt
template, the text embeddings of a class are averaged over its templates and
renormalised; an image's class is the one whose embedding is closest in
cosine. Images come through the one feature pass (``analysis/features.py``)
on ``data.eval_split`` with the eval transform.

Class names and templates by name (``zeroshot.classnames`` / ``templates``):
``imagenet`` (1000 names) with ``openai`` (80 prompts) or ``simple`` (7),
shipped in ``evals/data/imagenet_zeroshot.json``; ``embedded``: the embedded
dataset's shape classes with prompts worded like its captions. Lists may also
be given directly in the config.
"""

import functools
import json
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from vitreg_jax.analysis import features as features_lib
from vitreg_jax.data import embedded, pipeline

IMAGENET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                             'imagenet_zeroshot.json')
PROMPT_BATCH = 1024  # prompts encoded per jitted call (the last call is padded)


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


# The embedded captions read "a red circle above a small blue square".
EMBEDDED_TEMPLATES = tuple(f'{_article(c)} {c} {{}}' for c in embedded.COLOURS) + (
    'a {} on its own', 'a picture of a {}')


@functools.lru_cache()
def _imagenet() -> dict:
  with open(IMAGENET_FILE, encoding='utf-8') as f:
    return json.load(f)


def classnames(spec, num_classes: int | None = None) -> tuple[str, ...]:
  """``'imagenet'``, ``'embedded'`` (the first ``num_classes`` shapes) or a list of names."""
  if spec == 'imagenet':
    return tuple(_imagenet()['classnames'])
  if spec == 'embedded':
    return tuple(embedded.SHAPES[:num_classes or len(embedded.SHAPES)])
  if isinstance(spec, str):
    raise ValueError(f"zeroshot.classnames={spec!r}; valid: 'imagenet', 'embedded' or a list")
  return tuple(spec)


def templates(spec) -> tuple[str, ...]:
  """``'openai'``, ``'simple'`` (ImageNet's), ``'embedded'`` or a list with ``{}`` for the name."""
  named = {'openai': lambda: _imagenet()['templates'],
           'simple': lambda: _imagenet()['simple_templates'],
           'embedded': lambda: EMBEDDED_TEMPLATES}
  if isinstance(spec, str):
    if spec not in named:
      raise ValueError(f'zeroshot.templates={spec!r}; valid: {sorted(named)} or a list')
    result = tuple(named[spec]())
  else:
    result = tuple(spec)
  bad = [t for t in result if t.count('{}') != 1]
  if not result or bad:
    raise ValueError(f'zeroshot templates need exactly one "{{}}" each; got {bad or "none"}')
  return result


class ZeroShotEvaluator:
  """``zeroshot_top1`` (in %) of ``select(state) -> (model, variables)`` on ``data.eval_split``.

  ``encode_image`` / ``encode_text`` name the model's two entry points: images
  -> dict with unit-norm ``embeds``; token ids -> unit-norm embeddings.
  """
  name = 'zeroshot'

  def __init__(self, config, select, *, names, prompts, tokenizer, encode_image, encode_text,
               every: int):
    self.config, self.select, self.every = config, select, every
    self.names, self.prompts, self.tokenizer = tuple(names), tuple(prompts), tokenizer
    self.encode_image = encode_image
    self._encode_text = jax.jit(lambda model, variables, tokens: model.apply(
        variables, tokens, method=encode_text), static_argnums=0)
    self._passes = features_lib.PassCache()

  @functools.cached_property
  def _prompt_tokens(self) -> np.ndarray:
    """Every class in every template, tokenised once (80k prompts for ImageNet)."""
    return self.tokenizer.tokenize([t.format(n) for n in self.names for t in self.prompts])

  def text_classifier(self, model, variables) -> np.ndarray:
    """``[classes, E]``: each class's prompt embeddings averaged, then renormalised."""
    tokens = self._prompt_tokens
    chunks = []
    for start in range(0, len(tokens), PROMPT_BATCH):
      chunk = tokens[start:start + PROMPT_BATCH]
      padded = np.zeros((PROMPT_BATCH if len(tokens) > PROMPT_BATCH else len(tokens),
                         tokens.shape[1]), tokens.dtype)
      padded[:len(chunk)] = chunk
      encoded = multihost_utils.process_allgather(self._encode_text(model, variables, padded),
                                                  tiled=True)
      chunks.append(np.asarray(encoded)[:len(chunk)])
    embeds = np.concatenate(chunks).astype(np.float64)
    per_class = embeds.reshape(len(self.names), len(self.prompts), -1).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=1, keepdims=True)

  def run(self, state, mesh, rules) -> dict[str, float]:
    model, variables = self.select(state)
    features = self._passes.get(model, ('embeds',), mesh, rules, method=self.encode_image)
    classifier = self.text_classifier(model, variables)
    batches = pipeline.build_eval_pipeline(self.config, split=self.config.data.eval_split,
                                           mesh=mesh)
    out = features.over(variables, batches, self.config.eval.max_eval_examples)
    labels = out['label']
    if labels.max() >= len(self.names):
      raise ValueError(f'label {labels.max()} in {self.config.data.eval_split!r} but only '
                       f'{len(self.names)} zero-shot class names')
    scores = out['embeds'].astype(np.float64) @ classifier.T
    return {'zeroshot_top1': 100.0 * float(np.mean(scores.argmax(1) == labels))}
