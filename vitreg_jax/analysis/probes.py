"""Linear probes on frozen features: the DINOv2 protocol, and single-token probes (REFERENCE §6).

``linear_probe`` trains one linear classifier per learning rate of the grid
*at once* (``vmap`` over the grid: one compiled program, the features read
once per step for all of them): SGD with momentum 0.9, cosine schedule, no
weight decay, cross-entropy, minibatches drawn with a fixed seed; the best
learning rate on the validation set is reported (the protocol selects on val,
as DINOv2's ``linear.py`` does). ``ridge_regression`` is the closed form the
pixel-reconstruction probe uses.

Features for the DINOv2 protocol: the cls token of the last ``n`` blocks
(``n`` in {1, 4}, after the final norm), optionally concatenated with the
mean of the last block's patch tokens (``avgpool``; registers excluded).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

# DINOv2's grid: 13 learning rates from 1e-5 to 0.1.
LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def dinov2_features(cls_layers, n_last: int, patch_mean=None) -> np.ndarray:
  """``[N, D * n_last (+ D)]``: the normed cls of the last ``n_last`` blocks (``cls_layers
  [L, N, D]``), then the mean patch token ``[N, D]`` when given (``avgpool``)."""
  cls_layers = np.asarray(cls_layers)
  if not 1 <= n_last <= len(cls_layers):
    raise ValueError(f'n_last={n_last}; the model has {len(cls_layers)} blocks')
  parts = list(cls_layers[-n_last:])
  if patch_mean is not None:
    parts.append(np.asarray(patch_mean))
  return np.concatenate(parts, axis=-1)


def _standardise(train, *others):
  mean, std = train.mean(0), train.std(0) + 1e-6
  return [(x - mean) / std for x in (train, *others)]


def linear_probe(train_x, train_y, val_x, val_y, *, num_classes: int, lrs=LR_GRID,
                 epochs: int = 10, batch_size: int = 256, seed: int = 0,
                 standardise: bool = False) -> dict:
  """Top-1 on ``val`` per learning rate: ``{'per_lr': {lr: acc}, 'best_lr', 'top1',
  'predictions'}`` (the best classifier's predicted val labels).

  Accuracies are fractions in [0, 1]. ``standardise`` scales features by the
  train set's mean/std (not in the DINOv2 protocol; for raw, unnormed tokens).
  """
  train_x, val_x = np.asarray(train_x, np.float32), np.asarray(val_x, np.float32)
  train_y, val_y = np.asarray(train_y, np.int32), np.asarray(val_y, np.int32)
  if len(train_x) != len(train_y) or len(val_x) != len(val_y):
    raise ValueError(f'features/labels differ in length: train {len(train_x)}/{len(train_y)}, '
                     f'val {len(val_x)}/{len(val_y)}')
  if standardise:
    train_x, val_x = _standardise(train_x, val_x)
  n, d = train_x.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = max(n // batch_size, 1)
  total = epochs * steps_per_epoch
  lrs_arr = jnp.asarray(lrs, jnp.float32)
  params = {'w': jnp.zeros((len(lrs), d, num_classes)), 'b': jnp.zeros((len(lrs), num_classes))}
  momentum = jax.tree.map(jnp.zeros_like, params)
  cosine = optax.cosine_decay_schedule(1.0, total)

  def loss_fn(p, x, y):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def run(params, momentum, x_all, y_all, order):
    def step(carry, i):
      params, momentum = carry
      rows = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
      x, y = x_all[rows], y_all[rows]
      grads = jax.vmap(jax.grad(loss_fn), in_axes=(0, None, None))(params, x, y)
      momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, grads)
      scale = (lrs_arr * cosine(i))
      params = jax.tree.map(lambda p, m: p - scale.reshape((-1,) + (1,) * (m.ndim - 1)) * m,
                            params, momentum)
      return (params, momentum), None
    (params, _), _ = jax.lax.scan(step, (params, momentum), jnp.arange(total))
    return params

  rng = np.random.default_rng(seed)
  # One permutation per epoch (a partial last batch dropped); step i reads rows [i b, (i+1) b).
  order = np.concatenate([rng.permutation(n)[:steps_per_epoch * batch_size]
                          for _ in range(epochs)])
  params = run(params, momentum, jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(order))
  logits = jnp.einsum('nd,ldc->lnc', jnp.asarray(val_x), params['w']) + params['b'][:, None]
  predictions = np.asarray(logits.argmax(-1))
  accuracy = (predictions == val_y[None]).mean(-1)
  per_lr = {float(lr): float(a) for lr, a in zip(lrs, accuracy)}
  best = int(np.argmax(accuracy))  # ties: the smallest learning rate
  return {'per_lr': per_lr, 'best_lr': float(lrs[best]), 'top1': float(accuracy[best]),
          'predictions': predictions[best]}


def ridge_regression(train_x, train_y, *, alpha: float = 1e-3):
  """``(W, b)`` minimising ``|X W + b - Y|^2 + alpha |W|^2`` (float64 closed form)."""
  x = np.asarray(train_x, np.float64)
  y = np.asarray(train_y, np.float64)
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc, yc = x - x_mean, y - y_mean
  w = np.linalg.solve(xc.T @ xc + alpha * len(x) * np.eye(x.shape[1]), xc.T @ yc)
  return w, y_mean - x_mean @ w
