"""The one training loop every recipe shares.

``run(config, workdir)``: mesh and recipe from the config, the data pipeline,
the latest checkpoint in ``workdir`` (resume is automatic), then steps with
logging, periodic evaluation, asynchronous checkpoints and, at the end, export
of the trained backbone. Recipes (``train/recipes.py``) only provide state,
step, FLOPs and, for SSL recipes, ``teacher_backbone(state)``.

Failure behaviour a pod user relies on:

* SIGTERM (and the TPU runtime's preemption notice) -> a checkpoint of the
  current step, then a clean return (exit code 0); the next launch resumes.
* A non-finite loss stops the run with an error *before* any checkpoint of
  the bad state is written: the loss is checked at every log and save step,
  and a NaN persists once it appears.
* Every random choice derives from ``(seed, step)`` and the data-iterator
  state is checkpointed, so a resumed run repeats an uninterrupted one.
"""

import importlib.util
import os
import signal
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vitreg_jax import checkpoint
from vitreg_jax.data import pipeline
from vitreg_jax.train import evaluate, metrics_log, mfu, recipes, sharded as sharded_lib


# Where each format goes under workdir/export (folders for vitreg and hf).
EXPORT_NAMES = {'vitreg': 'vitreg', 'hf': 'hf', 'dinov2': 'dinov2_backbone.pth',
                'timm': 'timm_model.safetensors'}


class NonFiniteLossError(FloatingPointError):
  pass


class _TerminationFlag:
  """Set by SIGTERM; checked between steps so the state is never half-updated."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning('received signal %d: checkpointing and exiting after this step', signum)
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, losses, last_saved: int | None) -> None:
  bad = [float(v) for v in np.atleast_1d(losses) if not np.isfinite(v)]
  if bad:
    raise NonFiniteLossError(
        f'loss became {bad[0]} at or before step {step}; stopping without saving this state '
        f'(last good checkpoint: step {last_saved}). Lower optim.base_lr, check the data, or '
        'raise optim.clip_grad / use float32.')


class BrokenInvariantError(RuntimeError):
  pass


def _check_zero(step: int, fetched, names) -> None:
  """Metrics a recipe promises to keep at exactly 0 (e.g. iBOT patches dropped from its budget)."""
  for name in names:
    bad = [float(m[name]) for m in fetched if float(m[name]) != 0.0]
    if bad:
      raise BrokenInvariantError(
          f'{name} = {bad[0]:g} at or before step {step}, but this run promises 0: the data '
          'pipeline and the train step disagree (e.g. the iBOT masks were not stratified within '
          'config.group_size images); stopping before the state is saved')


def _export(recipe, state, config, workdir: str) -> None:
  """The trained backbone in every configured format, under ``workdir/export/FORMAT``."""
  if not hasattr(recipe, 'teacher_backbone'):
    return
  from vitreg_jax import convert  # pylint: disable=import-outside-toplevel
  model, variables = recipe.teacher_backbone(state)
  variables = jax.tree.map(np.asarray, jax.device_get(
      multihost_utils.process_allgather(variables, tiled=True)))
  if jax.process_index() != 0:
    return
  for fmt in config.train.export_formats:
    if fmt not in EXPORT_NAMES:
      raise ValueError(f'train.export_formats has {fmt!r}; valid: {sorted(EXPORT_NAMES)}')
    target = os.path.join(workdir, 'export', EXPORT_NAMES[fmt])
    if target.endswith('.pth') and importlib.util.find_spec('torch') is None:
      logging.warning('skipped the %s export: .pth files need torch (pip install -e ".[torch]")',
                      fmt)
      continue
    convert.save(model, variables, f'{fmt}:{target}')
    logging.info('exported the backbone as %s to %s', fmt, target)


def export(config, workdir: str) -> None:
  """``--mode=export``: the latest checkpoint's backbone in every configured format."""
  sharded = sharded_lib.from_config(config)
  ckpt = checkpoint.RunCheckpointer(os.path.join(workdir, 'checkpoints'), save_every=1)
  state, step = ckpt.restore(sharded.abstract_sharded_state(), None)
  logging.info('exporting step %d', step)
  _export(sharded.recipe, state, config, workdir)
  ckpt.close()


def evaluate_checkpoint(config, workdir: str | None, random_init: bool = False) -> dict:
  """``--mode=eval``: kNN and token-norm metrics of the latest checkpoint's teacher.

  ``random_init`` evaluates the same network freshly initialised (seed
  ``config.seed``): the baseline SSL features must beat.
  """
  sharded = sharded_lib.from_config(config)
  if random_init:
    state = sharded.init(jax.random.key(config.seed))
  else:
    ckpt = checkpoint.RunCheckpointer(os.path.join(workdir, 'checkpoints'), save_every=1)
    state, step = ckpt.restore(sharded.abstract_sharded_state(), None)
    ckpt.close()
    logging.info('evaluating step %d', step)
  model, variables = sharded.recipe.teacher_backbone(state)
  return evaluate.knn_evaluation(model, variables, config, sharded.mesh, sharded.rules)


def run(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``; returns the last logged metrics."""
  sharded = sharded_lib.from_config(config)
  recipe = sharded.recipe
  global_batch = recipes.global_batch_size(config)
  # Fails early, naming the numbers, if the batch does not divide; says which data shard
  # this process reads (processes holding the same rows read the same one).
  layout = sharded.batch_layout(global_batch)
  total_steps = int(recipe.total_steps)
  train_cfg = config.train

  data_iter = pipeline.build_train_pipeline(config, shard_index=layout.shard_index,
                                            num_shards=layout.num_shards, seed=config.seed)
  ckpt = checkpoint.RunCheckpointer(
      os.path.join(workdir, 'checkpoints'), save_every=train_cfg.checkpoint_every,
      keep=train_cfg.keep_checkpoints, best_metric='knn_top1')
  if ckpt.latest_step is not None:
    state, start_step = ckpt.restore(sharded.abstract_sharded_state(), data_iter,
                                     set_aside_unreadable=True)
    logging.info('resuming from step %d', start_step)
  else:
    state, start_step = sharded.init(jax.random.key(config.seed)), 0
  writer = metrics_log.MetricWriter(workdir)
  total_peak = mfu.peak_flops(train_cfg.peak_flops_per_device, jax.device_count())
  flops_per_step = recipe.analytic_flops(global_batch)
  rng = jax.random.key(config.seed)
  batch_keys = tuple(recipe.batch_axes)
  termination = _TerminationFlag()
  pending, skipped_images, last_saved = [], 0, ckpt.latest_step
  last_metrics: dict = {}
  window_start, window_steps = time.perf_counter(), 0
  step = start_step
  try:
    while step < total_steps:
      local = next(data_iter)
      skipped_images += int(np.sum(local.get('skipped', 0)))
      batch = sharded.global_batch({k: local[k] for k in batch_keys}, global_batch)
      state, metrics = sharded.train_step(state, batch, rng)
      step += 1
      window_steps += 1
      pending.append(metrics)
      stopping = termination.requested or checkpoint.reached_preemption(step)
      log_now = step % train_cfg.log_every == 0 or step == total_steps
      save_now = ckpt.should_save(step) or step == total_steps or stopping
      if log_now or save_now:
        fetched = jax.device_get(pending)
        _check_finite(step, [m['loss'] for m in fetched], last_saved)
        _check_zero(step, fetched, recipe.zero_metrics)
        elapsed = time.perf_counter() - window_start
        seconds_per_step = elapsed / max(window_steps, 1)
        first = step - len(fetched) + 1
        for offset, values in enumerate(fetched):
          writer.write(first + offset, values)
        last_metrics = dict(fetched[-1])
        if log_now:
          logging.info(metrics_log.progress_line(
              step, total_steps, last_metrics, global_batch / seconds_per_step,
              (total_steps - step) * seconds_per_step,
              mfu.mfu(flops_per_step, seconds_per_step, total_peak), skipped_images))
          writer.write(step, {'images_per_second': global_batch / seconds_per_step,
                              'skipped_images': skipped_images,
                              'mfu': mfu.mfu(flops_per_step, seconds_per_step, total_peak)})
        pending = []
        window_start, window_steps = time.perf_counter(), 0
      eval_metrics = None
      if hasattr(recipe, 'teacher_backbone') and (
          step % train_cfg.eval_every == 0 or step == total_steps):
        model, variables = recipe.teacher_backbone(state)
        eval_metrics = evaluate.knn_evaluation(model, variables, config, sharded.mesh,
                                               sharded.rules)
        writer.write(step, eval_metrics)
        last_metrics.update(eval_metrics)
        logging.info('eval at step %d: %s', step,
                     ', '.join(f'{k} {v:.4g}' for k, v in eval_metrics.items()))
        window_start = time.perf_counter()  # evaluation time is not training throughput
      if save_now:
        ckpt.save(step, state, data_iter, config, metrics=eval_metrics, force=True)
        last_saved = step
      if stopping:
        logging.warning('stopped at step %d on request; checkpoint saved', step)
        break
    ckpt.wait()
    if step == total_steps:
      _export(recipe, state, config, workdir)
  finally:
    termination.restore()
    ckpt.close()
    writer.close()
    data_iter.close()
  return last_metrics
