"""Running the analysis CLIs of ``experiments/`` in-process, on a small random timm ViT.

The model is timm's own ``VisionTransformer`` (DINOv2 layout, 4 registers,
width 384 so the converter infers the heads, 2 blocks, patch 8), randomised
and saved as a state dict: the CLIs read it through ``timm:PATH`` exactly as
a user's downloaded file.
"""

import importlib.util
import os

import numpy as np
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


# Planted patches: mid-grey images (channel 0 normalises to ~0) with these raster indices of a
# 4 x 4 grid of 8-px patches bright in channel 0 (normalised ~2.25).
PATCH, GRID = 8, 4
PLANTED = [0, 3, 5, 12]  # 0, 3, 12 on the border, 5 inside
MID_GREY = round(0.485 * 255)


def planted_images(count, rng):
  """uint8 images [count, 32, 32, 3]: grey plus 0-2 noise, PLANTED patches bright in channel 0."""
  images = np.full((count, PATCH * GRID, PATCH * GRID, 3), MID_GREY, np.uint8)
  images += rng.integers(0, 3, images.shape, dtype=np.uint8)
  for index in PLANTED:
    r, c = divmod(index, GRID)
    images[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH, 0] = 255
  return images
