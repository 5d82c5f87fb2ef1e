"""Our OpenCLIP folder exports in PyTorch: ``create_model(folder)`` on any OpenCLIP version.

A tower with registers is a timm trunk whose ``reg_tokens`` / ``no_embed_class``
travel in ``vision_cfg.timm_model_kwargs``. OpenCLIP after 3.3.0 passes those
to ``timm.create_model`` and ``open_clip.create_model('local-dir:FOLDER')`` is
all it takes; 3.3.0 and older do not know the key. There the config without it
is registered under a unique name and built by that name while
``timm.create_model`` gets the kwargs, as later versions give them; the
weights still load strictly (``pretrained=`` the folder's safetensors file).
Needs torch and open_clip (the ``[torch]`` extra).
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile

from vitreg_jax.convert import open_clip


def knows_timm_model_kwargs() -> bool:
  from open_clip.model import CLIPVisionCfg  # pylint: disable=import-outside-toplevel
  return 'timm_model_kwargs' in {f.name for f in dataclasses.fields(CLIPVisionCfg)}


@contextlib.contextmanager
def _timm_kwargs(kwargs: dict):
  """``timm.create_model`` gets ``kwargs`` too, inside the block only."""
  import timm  # pylint: disable=import-outside-toplevel
  create = timm.create_model
  timm.create_model = lambda name, **kw: create(name, **{**kw, **kwargs})
  try:
    yield
  finally:
    timm.create_model = create


def create_model(folder: str):
  """The ``open_clip.CLIP`` of an ``open_clip:FOLDER`` export, in eval mode."""
  import open_clip as open_clip_torch  # pylint: disable=import-outside-toplevel
  folder = os.path.abspath(folder)
  config_file = os.path.join(folder, open_clip.CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'{folder} has no {open_clip.CONFIG_FILE}: not an open_clip export')
  with open(config_file, encoding='utf-8') as f:
    config = json.load(f)['model_cfg']
  kwargs = config['vision_cfg'].get('timm_model_kwargs')
  if not kwargs or knows_timm_model_kwargs():
    return open_clip_torch.create_model(f'local-dir:{folder}').eval()
  name = 'vitreg-' + hashlib.sha1(folder.encode()).hexdigest()[:12]  # the registry is global
  vision = {k: v for k, v in config['vision_cfg'].items() if k != 'timm_model_kwargs'}
  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, f'{name}.json')
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({**config, 'vision_cfg': vision}, f)
    open_clip_torch.add_model_config(path)
  with _timm_kwargs(kwargs):
    model = open_clip_torch.create_model(
        name, pretrained=os.path.join(folder, open_clip.WEIGHTS_FILE))
  return model.eval()
