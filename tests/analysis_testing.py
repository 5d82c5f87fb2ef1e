"""Running the analysis CLIs of ``experiments/`` in-process, on a small random timm ViT.

The model is timm's own ``VisionTransformer`` (DINOv2 layout, 4 registers,
width 384 so the converter infers the heads, 2 blocks, patch 8), randomised
and saved as a state dict: the CLIs read it through ``timm:PATH`` exactly as
a user's downloaded file.
"""

import importlib.util
import os

import safetensors.torch

import convert_testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The embedded dataset at a test's size: 48-px images, 6 classes, 64 val images.
EMBEDDED = ['--embedded', 'image_size=48', '--embedded', 'num_classes=6',
            '--embedded', 'num_val=64', '--embedded', 'num_train=128']


def experiment(name: str):
  """The module of ``experiments/{name}.py``."""
  path = os.path.join(REPO, 'experiments', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'experiments_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def timm_checkpoint(directory: str, registers: int = 4) -> str:
  """``timm:PATH`` of a random timm DINOv2-layout ViT (patch 8, 48 px)."""
  config = 'reg4' if registers else 'noreg'
  model = convert_testing.timm_model(config, seed=1, img_size=48, patch_size=8,
                                     **({'reg_tokens': registers} if registers else {}))
  path = os.path.join(directory, f'timm_reg{registers}.safetensors')
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return f'timm:{path}'
