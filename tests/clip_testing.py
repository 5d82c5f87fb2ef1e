"""Shared pieces of the CLIP tests: tiny random models on both sides and OpenCLIP loading.

Every weight is random at scales that keep activations O(1), LayerNorm scales
near 1 and the logit scale near its trained range, so a wrong layout anywhere
moves the embeddings by far more than the 1e-5 tolerance.
"""

import pathlib

import numpy as np

from vitreg_jax.convert import params as params_lib
from vitreg_jax.models.clip import CLIP
from vitreg_jax.models.text import TextTransformer
from vitreg_jax.models.vit import VisionTransformer

TOL = 1e-5
IMG, PATCH, WIDTH, HEADS, DEPTH = 32, 8, 64, 4, 2
TEXT_WIDTH, TEXT_HEADS, VOCAB, CONTEXT, EMBED = 32, 2, 200, 12, 24


def tiny_clip(num_registers=4, pool='cls', openclip_style=False, class_token=True,
              **clip_kwargs) -> CLIP:
  """Our two towers; ``openclip_style``: OpenCLIP's own ViT (norm_pre, no patch bias, eps 1e-5)."""
  style = dict(norm_pre=True, patch_bias=False, norm_eps=1e-5) if openclip_style else {}
  visual = VisionTransformer(patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                             num_registers=num_registers, class_token=class_token, img_size=IMG,
                             layerscale_init=1e-4, interpolate_antialias=True,
                             interpolate_offset=0.0, **style)
  text = TextTransformer(vocab_size=VOCAB, context_length=CONTEXT, width=TEXT_WIDTH, depth=DEPTH,
                         num_heads=TEXT_HEADS, embed_dim=EMBED)
  return CLIP(visual, text, embed_dim=EMBED, pool=pool, **clip_kwargs)


def _scaled(leaf: str, n):
  """A parameter named ``leaf`` (either side's name) from standard normal noise ``n``."""
  if leaf in ('scale', 'ln_weight'):
    return 1 + 0.1 * n
  if leaf == 'logit_scale':
    return 2.5 + 0.1 * n
  if leaf == 'logit_bias':
    return -1 + 0.1 * n
  if leaf in ('pos_embed', 'positional_embedding'):
    return 0.2 * n
  if leaf.endswith(('_token', '_tokens', 'embedding', 'gamma')):  # also class_embedding
    return 0.5 * n
  return 0.05 * n


def random_variables(model, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  flat = {}
  for name, spec in params_lib.clip_expected_shapes(model).items():
    n = rng.standard_normal(spec.shape).astype(np.float32)
    flat[name] = _scaled(name.rsplit('/', 1)[-1], n)
  return params_lib.clip_to_variables(flat, model)


def randomize_open_clip_(module, seed: int):
  """Every parameter of an OpenCLIP model random (torch), as ``random_variables``."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      n = torch.randn(p.shape, generator=gen)
      parts = name.split('.')
      leaf = parts[-1]
      if leaf == 'weight' and any(q.startswith(('ln_', 'norm')) for q in parts[:-1]):
        leaf = 'ln_weight'
      elif leaf == 'weight' and 'token_embedding' in parts:
        leaf = 'embedding'
      p.copy_(_scaled(leaf, n))
  return module.eval()


def images(batch=2, seed=0):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def token_ids(seed=0):
  """``[sot, words..., eot, 0...]`` rows with the EOT the largest id, as CLIP's tokenizer."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((3, CONTEXT), np.int64)
  for row, length in enumerate((2, 5, CONTEXT - 2)):
    ids[row, 0] = VOCAB - 2
    ids[row, 1:1 + length] = rng.integers(1, VOCAB - 2, length)
    ids[row, 1 + length] = VOCAB - 1
  return ids


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def open_clip_outputs(ref, x, ids) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    tokens = torch.from_numpy(ids)
    image = ref.encode_image(x, normalize=True).numpy()
    text = ref.encode_text(tokens, normalize=True).numpy()
    logits = ref.get_logits(x, tokens)[0].numpy()
  return {'image_embeds': image, 'text_embeds': text, 'logits': logits}


def open_clip_from_folder(folder: pathlib.Path):
  """``open_clip.create_model`` of our folder export, strict weights (``convert.open_clip_torch``)."""
  from vitreg_jax.convert import open_clip_torch  # pylint: disable=import-outside-toplevel
  return open_clip_torch.create_model(str(folder))
