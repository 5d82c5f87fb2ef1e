"""vitreg_jax: Vision Transformers Need Registers, in JAX/Flax."""
