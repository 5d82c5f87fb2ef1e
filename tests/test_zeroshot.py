"""Zero-shot evaluation: prompts -> averaged, renormalised class embeddings -> top-1, against a
direct computation with the model's own entry points; the shipped ImageNet names and prompts."""

import jax
import numpy as np
import pytest

from vitreg_jax import config as config_lib
from vitreg_jax import recipes
from vitreg_jax.data import embedded, pipeline
from vitreg_jax.evals import zeroshot
from vitreg_jax.models.clip import CLIP

import main_testing


def smoke_recipe():
  config = config_lib.from_file(f'{main_testing.REPO}/configs/clip_reg.py', 'smoke')
  config.model.update(depth=1)
  config.text.update(depth=1)
  config.eval.max_eval_examples = 40
  config.data.batch_size = 16
  return config, recipes.build(config)


def test_zero_shot_top1_equals_a_direct_computation():
  config, recipe = smoke_recipe()
  state = recipe.init_state(jax.random.key(3))
  from vitreg_jax.train.state import unbox  # pylint: disable=import-outside-toplevel
  variables = {'params': unbox(state.params)}
  evaluator = recipe.evaluators()[0]
  assert evaluator.names == embedded.SHAPES[:6]
  state = state.replace(params=variables['params'])
  got = evaluator.run(state, mesh=None, rules=None)

  # the same by hand: every prompt of a class, averaged, renormalised
  classifier = []
  for name in embedded.SHAPES[:6]:
    prompts = [t.format(name) for t in zeroshot.EMBEDDED_TEMPLATES]
    tokens = recipe.tokenizer.tokenize(prompts)
    embeds = np.asarray(recipe.model.apply(variables, tokens, method=CLIP.encode_text),
                        np.float64)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-5)
    mean = embeds.mean(0)
    classifier.append(mean / np.linalg.norm(mean))
  classifier = np.stack(classifier)
  np.testing.assert_allclose(evaluator.text_classifier(recipe.model, variables), classifier,
                             atol=1e-5)
  images, labels = [], []
  for batch in pipeline.build_eval_pipeline(config, split='val'):
    keep = batch['valid'].astype(bool)
    out = recipe.model.apply(variables, batch['image'], method=CLIP.encode_image)
    images.append(np.asarray(out['embeds'])[keep])
    labels.append(batch['label'][keep])
  images, labels = np.concatenate(images)[:40], np.concatenate(labels)[:40]
  want = 100.0 * np.mean((images @ classifier.T).argmax(1) == labels)
  assert got == {'zeroshot_top1': pytest.approx(want)}


def test_shipped_imagenet_names_and_prompts():
  names = zeroshot.classnames('imagenet')
  assert len(names) == 1000 and len(set(names)) >= 998  # two ImageNet names repeat
  assert names[0] == 'tench' and names[-1] == 'toilet paper'
  openai = zeroshot.templates('openai')
  assert len(openai) == 80 and all(t.count('{}') == 1 for t in openai)
  assert len(zeroshot.templates('simple')) == 7


def test_bad_names_and_prompts_are_refused():
  with pytest.raises(ValueError, match=r"zeroshot.classnames='imagenet21k'.*valid"):
    zeroshot.classnames('imagenet21k')
  with pytest.raises(ValueError, match=r"zeroshot.templates='fancy'; valid"):
    zeroshot.templates('fancy')
  with pytest.raises(ValueError, match='exactly one'):
    zeroshot.templates(['a photo of a dog'])
