"""Orbax checkpoints of a whole run: train state, data-iterator state, config.

One step directory holds three items so a resumed run continues exactly where
the interrupted one stopped, data included:

* ``state``: the train-state pytree (sharded arrays; restored straight into the
  target shardings, so a pod never gathers a ViT-g onto one host);
* ``data``: every process's grain iterator state (one JSON file per process);
* ``config``: the run's config as JSON: compared with the command line's on
  resume, export and eval (differences are named), and used when
  export/eval are run without ``--config``.

Saves are asynchronous; the latest ``keep`` checkpoints are kept, plus the best
one by ``best_metric`` when the run reports it.
"""

import json

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from vitreg_jax import config as config_lib

# Settings a resumed run may change without changing what it computes.
MAY_CHANGE = ('train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
              'train.eval_every', 'train.export_formats', 'train.peak_flops_per_device',
              'data.num_workers', 'data.worker_buffer_size', 'data.read_threads',
              'data.device_prefetch', 'data.data_dir', 'distributed.mode',
              'distributed.coordinator_address', 'distributed.num_processes',
              'distributed.process_id', 'eval.max_train_examples', 'eval.max_eval_examples')


class ConfigMismatchError(ValueError):
  """The command line's config differs from the one the checkpoints were trained with."""


class RunCheckpointer:
  """Saves and restores a run in ``workdir/checkpoints``."""

  def __init__(self, directory, *, save_every: int, keep: int = 3,
               best_metric: str | None = None, best_mode: str = 'max',
               async_save: bool = True):
    preserve = [policies.LatestN(n=keep)]
    if best_metric:
      preserve.append(policies.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], n=1,
          reverse=best_mode == 'min', keep_checkpoints_without_metrics=True))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        directory, item_names=('state', 'data', 'config'), options=options)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict,
           metrics: dict | None = None, force: bool = False) -> bool:
    """Starts an (async) save; the data state is captured before returning."""
    items = {
        'state': ocp.args.StandardSave(state),
        'config': ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items),
                              metrics=metrics, force=force)

  def restore(self, abstract_state, data_iterator, step: int | None = None,
              set_aside_unreadable: bool = False):
    """Restores ``step`` (default: the newest readable) into ``abstract_state``'s shardings.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings
    (from ``jax.eval_shape`` + the sharding rules). The data iterator is
    restored in place. Without ``step``, a checkpoint that cannot be read (a
    save cut short by a crash, a truncated file) is reported and skipped for
    the next older one; nothing is deleted. A resuming run passes
    ``set_aside_unreadable``: the unreadable steps move to
    ``<directory>.unreadable/`` so the run can save those steps again.
    Returns ``(state, step)``.
    """
    candidates = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
    if not candidates:
      raise FileNotFoundError(f'no checkpoint in {self._manager.directory}')
    first_error = None
    for candidate in candidates:
      try:
        state = self._restore_step(abstract_state, data_iterator, candidate)
      except Exception as error:  # pylint: disable=broad-except  (tensorstore, orbax, json)
        if step is not None:
          raise
        first_error = first_error or error
        logging.warning('checkpoint at step %d in %s is unreadable (%s: %s); trying the '
                        'previous one (kept on disk)', candidate, self._manager.directory,
                        type(error).__name__, str(error).splitlines()[0][:200])
        continue
      unreadable = [c for c in candidates if c > candidate]
      if unreadable:
        logging.warning('restored step %d: the newer checkpoint(s) %s could not be read',
                        candidate, unreadable)
        if set_aside_unreadable:
          self._set_aside(unreadable)
      logging.info('restored checkpoint at step %d from %s', candidate, self._manager.directory)
      return state, candidate
    raise RuntimeError(f'no readable checkpoint in {self._manager.directory} '
                       f'(tried steps {candidates})') from first_error

  def _set_aside(self, steps) -> None:
    """Moves unreadable step directories beside the checkpoints (kept, never deleted)."""
    directory = epath.Path(self._manager.directory)
    aside = directory.parent / f'{directory.name}.unreadable'
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / str(step)
        while target.exists():
          target = target.parent / f'{target.name}_'
        (directory / str(step)).rename(target)
        logging.warning('moved the unreadable checkpoint of step %d to %s', step, target)
    multihost_utils.sync_global_devices('vitreg_jax.checkpoint.set_aside')
    self._manager.reload()

  def _restore_step(self, abstract_state, data_iterator, step: int):
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))['state']

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def saved_config(self) -> tuple[dict, int] | None:
    """``(config, step)`` of the newest checkpoint whose config reads, else None."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore_config(step), step
      except Exception:  # pylint: disable=broad-except  (a damaged step: try the previous)
        continue
    return None

  def check_config(self, config: ml_collections.ConfigDict, allow_changes: bool = False) -> None:
    """Fails naming every setting that differs from the saved config (``MAY_CHANGE`` aside).

    With ``allow_changes`` the differences are only reported.
    """
    saved = self.saved_config()
    if saved is None:
      return
    saved_config, step = saved
    current = json.loads(config.to_json_best_effort())
    diffs = config_lib.differences(saved_config, current, ignore=MAY_CHANGE)
    if not diffs:
      return
    message = (f'the config differs from the one saved with step {step} in '
               f'{self._manager.directory}: ' + '; '.join(diffs))
    if allow_changes:
      logging.warning('%s (continuing: --allow_config_changes)', message)
      return
    raise ConfigMismatchError(
        message + '. Use the saved config (omit --config for export/eval), a new --workdir, '
        'or --allow_config_changes to continue with the new values')

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def reached_preemption(step: int) -> bool:
  """True on every process once the TPU runtime announced a preemption."""
  try:
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)
  except (RuntimeError, ValueError):  # no preemption service (CPU, GPU clusters)
    return False
