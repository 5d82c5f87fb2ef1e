"""Analytic FLOP counts (matmuls only, 2 FLOPs per multiply-add).

The planner prints these next to XLA's cost analysis; MFU uses them. Norms,
softmax and activations are left out (a few % at ViT sizes), as is
rematerialisation: these are *model* FLOPs. A training step costs three
forward passes (the backward pass is two matmuls per forward matmul).
"""

from vitreg_jax.models.vit import VisionTransformer

TRAIN_FORWARD_MULTIPLIER = 3


def vit_forward_flops(model: VisionTransformer, image_hw: tuple[int, int],
                      branch_fraction: float = 1.0) -> float:
  """FLOPs of one image through ``model`` at ``image_hw`` (no head).

  ``branch_fraction``: the share of images whose residual branches run (DINOv2's
  subset drop path skips the others' attention and MLP entirely).
  """
  h, w = image_hw
  p, d = model.patch_size, model.embed_dim
  patches = (h // p) * (w // p)
  tokens = patches + model.num_prefix_tokens
  hidden = model.mlp_hidden_dim
  ffn_matmuls = 3 if model.ffn == 'swiglu' else 2  # swiglu: w12 (2 x D x M) + w3 (M x D)
  per_block = (
      2 * tokens * d * 3 * d         # qkv
      + 2 * 2 * tokens * tokens * d  # q k^T and probs @ v
      + 2 * tokens * d * d           # proj
      + 2 * ffn_matmuls * tokens * d * hidden)
  patch_embed = 2 * patches * p * p * 3 * d
  return float(patch_embed + branch_fraction * model.depth * per_block)


def dense_flops(in_features: int, out_features: int) -> float:
  return 2.0 * in_features * out_features
