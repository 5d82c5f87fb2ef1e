"""The one training loop every recipe shares.

``run(recipe, config, workdir)``: the recipe on the config's mesh, the data
pipeline over the recipe's batch function and the batch layout, the latest
readable checkpoint in ``workdir`` (resume is automatic, the saved config is
checked against this one), then steps with logging, the recipe's evaluators
on their schedule, asynchronous checkpoints and, at the end, the recipe's
exports. The loop sees a recipe only through ``train/recipe.py``.

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
import shlex
import signal
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vitreg_jax import checkpoint
from vitreg_jax.data import pipeline
from vitreg_jax.train import metrics_log, mfu, sharded as sharded_lib


# Where each format goes under workdir/export (folders for vitreg and hf).
EXPORT_NAMES = {'vitreg': 'vitreg', 'hf': 'hf', 'dinov2': 'dinov2_backbone.pth',
                'timm': 'timm_model.safetensors', 'open_clip': 'open_clip'}
TWO_TOWER_FORMATS = ('open_clip',)  # written with convert.save_clip


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


def _check_finite(step: int, losses, last_saved: int | None, hint: str) -> None:
  bad = [float(v) for v in np.atleast_1d(losses) if not np.isfinite(v)]
  if bad:
    raise NonFiniteLossError(
        f'loss became {bad[0]} at or before step {step}; stopping without saving this state '
        f'(last good checkpoint: step {last_saved}). {hint[:1].upper()}{hint[1:]}.')


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


def export_paths(name: str, workdir: str) -> dict[str, str]:
  """Format -> path of export ``name`` (the recipe's main export ``backbone`` keeps plain names)."""
  prefix = '' if name == 'backbone' else f'{name}_'
  return {fmt: os.path.join(workdir, 'export', prefix + leaf) for fmt, leaf in EXPORT_NAMES.items()}


def _export(recipe, state, config, workdir: str) -> dict[str, list[str]]:
  """The recipe's exports in every configured format; returns name -> written paths."""
  from vitreg_jax import convert  # pylint: disable=import-outside-toplevel
  backbone_formats = sorted(set(EXPORT_NAMES) - set(TWO_TOWER_FORMATS))
  unknown = [f for f in config.train.export_formats if f not in backbone_formats]
  if unknown:
    raise ValueError(f'train.export_formats has {unknown[0]!r}; valid: {backbone_formats}')
  written = {}
  for name, item in recipe.exports(state).items():
    variables, head = jax.tree.map(np.asarray, jax.device_get(
        multihost_utils.process_allgather((item.variables, item.head), tiled=True)))
    if jax.process_index() != 0:
      continue
    paths = export_paths(name, workdir)
    for fmt in item.formats or config.train.export_formats:
      target = paths[fmt]
      if target.endswith('.pth') and importlib.util.find_spec('torch') is None:
        logging.warning('skipped the %s export: .pth files need torch (pip install -e ".[torch]")',
                        fmt)
        continue
      options = dict(item.convert_options.get(fmt, {}))
      if head is not None and fmt == 'timm':
        options['head'] = head
      save = convert.save_clip if fmt in TWO_TOWER_FORMATS else convert.save
      save(item.module, variables, f'{fmt}:{target}', **options)
      written.setdefault(name, []).append(target)
  return written


def _places(workdir: str) -> dict[str, str]:
  return {'checkpoints': os.path.join(workdir, 'checkpoints'),
          'metrics': os.path.join(workdir, 'metrics.jsonl'),
          'tensorboard': os.path.join(workdir, 'tensorboard')}


def _next_commands(workdir: str, finished: bool, written: dict[str, list[str]]) -> dict[str, str]:
  """Commands a user runs on this run's results (quoted for a shell)."""
  quoted = shlex.quote(workdir)
  commands = {} if finished else {'resume': 'run the same command again'}
  commands['curves'] = f'tensorboard --logdir {shlex.quote(_places(workdir)["tensorboard"])}'
  commands['evaluate'] = f'python -m vitreg_jax.main --mode=eval --workdir={quoted}'
  if export_paths('backbone', workdir)['vitreg'] in written.get('backbone', ()):
    out = shlex.quote(os.path.join(workdir, 'analysis'))
    commands['analyse'] = (f'python experiments/artifacts.py --model workdir:{quoted} '
                           f'--out {out}/artifacts  (and attention_maps.py, lost.py, knn.py ...)')
  return commands


def _open_checkpoints(workdir: str, config, recipe, **kwargs) -> checkpoint.RunCheckpointer:
  best = recipe.best_metric
  return checkpoint.RunCheckpointer(
      os.path.join(workdir, 'checkpoints'), best_metric=best[0] if best else None,
      best_mode=best[1] if best else 'max', **kwargs)


def _restore(recipe, config, workdir: str, allow_config_changes: bool = False):
  """``(sharded, state, step)`` of the latest readable checkpoint, the saved config checked."""
  sharded = sharded_lib.ShardedRecipe.from_config(recipe, config)
  ckpt = _open_checkpoints(workdir, config, recipe, save_every=1)
  try:
    ckpt.check_config(config, allow_config_changes)
    state, step = ckpt.restore(sharded.abstract_sharded_state(), None)
  finally:
    ckpt.close()
  return sharded, state, step


def export(recipe, config, workdir: str, allow_config_changes: bool = False) -> dict[str, list[str]]:
  """``--mode=export``: the latest readable checkpoint's exports in every configured format."""
  _, state, step = _restore(recipe, config, workdir, allow_config_changes)
  written = _export(recipe, state, config, workdir)
  metrics_log.summary(f'exported step {step}', {}, written)
  return written


def evaluate_checkpoint(recipe, config, workdir: str | None, random_init: bool = False,
                        allow_config_changes: bool = False) -> dict:
  """``--mode=eval``: every evaluator of the recipe on the latest readable checkpoint.

  ``random_init`` evaluates the same network freshly initialised (seed
  ``config.seed``): the baseline learned features must beat.
  """
  if random_init:
    sharded = sharded_lib.ShardedRecipe.from_config(recipe, config)
    state = sharded.init(jax.random.key(config.seed))
  else:
    sharded, state, step = _restore(recipe, config, workdir, allow_config_changes)
    logging.info('evaluating step %d', step)
  metrics = {}
  for evaluator in recipe.evaluators():
    metrics.update(evaluator.run(state, sharded.mesh, sharded.rules))
  return metrics


def _due(evaluator, step: int, total_steps: int) -> bool:
  return step == total_steps or (evaluator.every > 0 and step % evaluator.every == 0)


def run(recipe, config, workdir: str, allow_config_changes: bool = False) -> dict:
  """Trains ``recipe`` (built from ``config``) in ``workdir``; returns the last logged metrics."""
  sharded = sharded_lib.ShardedRecipe.from_config(recipe, config)
  global_batch = int(recipe.global_batch_size)
  # Fails early, naming the numbers, if the batch does not divide the mesh; says which
  # rows this process feeds and which data shard it reads.
  layout = sharded.batch_layout(global_batch)
  total_steps = int(recipe.total_steps)
  train_cfg = config.train
  evaluators = list(recipe.evaluators())

  data_iter = pipeline.build_train_pipeline(config, recipe.host_batches, layout=layout,
                                            seed=config.seed)
  ckpt = _open_checkpoints(workdir, config, recipe, save_every=train_cfg.checkpoint_every,
                           keep=train_cfg.keep_checkpoints)
  if ckpt.latest_step is not None:
    ckpt.check_config(config, allow_config_changes)
    state, start_step = ckpt.restore(sharded.abstract_sharded_state(), data_iter,
                                     set_aside_unreadable=True)
    logging.warning('resuming from step %d of %d', start_step, total_steps)
  else:
    state, start_step = sharded.init(jax.random.key(config.seed)), 0
  writer = metrics_log.MetricWriter(workdir)
  total_peak = mfu.peak_flops(train_cfg.peak_flops_per_device, jax.device_count())
  flops_per_step = recipe.analytic_flops(global_batch)
  rng = jax.random.key(config.seed)
  batch_keys = tuple(recipe.batch_spec)
  termination = _TerminationFlag()
  pending, skipped_images, last_saved = [], 0, ckpt.latest_step
  last_metrics: dict = {}
  window_start, window_steps = time.perf_counter(), 0
  step = start_step
  written = {}
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
        _check_finite(step, [m['loss'] for m in fetched], last_saved, recipe.nonfinite_hint)
        _check_zero(step, fetched, recipe.zero_metrics)
        elapsed = time.perf_counter() - window_start
        seconds_per_step = elapsed / max(window_steps, 1)
        first = step - len(fetched) + 1
        for offset, values in enumerate(fetched):
          writer.write(first + offset, values)
        last_metrics = dict(fetched[-1])
        if log_now:
          utilisation = mfu.mfu(flops_per_step, seconds_per_step, total_peak)
          metrics_log.progress(metrics_log.progress_line(
              step, total_steps, last_metrics, recipe.progress_keys,
              global_batch / seconds_per_step, (total_steps - step) * seconds_per_step,
              utilisation, skipped_images))
          writer.write(step, {'images_per_second': global_batch / seconds_per_step,
                              'skipped_images': skipped_images, 'mfu': utilisation})
        pending = []
        window_start, window_steps = time.perf_counter(), 0
      eval_metrics = {}
      for evaluator in evaluators:
        if _due(evaluator, step, total_steps):
          eval_metrics.update(evaluator.run(state, sharded.mesh, sharded.rules))
      if eval_metrics:
        writer.write(step, eval_metrics)
        last_metrics.update(eval_metrics)
        metrics_log.progress(f'eval at step {step}: ' + ', '.join(
            f'{k} {v:.4g}' for k, v in eval_metrics.items()))
        window_start = time.perf_counter()  # evaluation time is not training throughput
      if save_now:
        ckpt.save(step, state, data_iter, config, metrics=eval_metrics or None, force=True)
        last_saved = step
      if stopping:
        logging.warning('stopped at step %d on request; checkpoint saved', step)
        break
    ckpt.wait()
    if step == total_steps:
      written = _export(recipe, state, config, workdir)
  finally:
    termination.restore()
    ckpt.close()
    writer.close()
    data_iter.close()
  finished = step == total_steps
  metrics_log.summary(
      f'{"finished" if finished else "stopped"} at step {step} of {total_steps}',
      _places(workdir), written, _next_commands(workdir, finished, written))
  return last_metrics
