"""Orbax checkpoints of a whole run: train state, data-iterator state, config.

One step directory holds three items so a resumed run continues exactly where
the interrupted one stopped, data included:

* ``state``: the train-state pytree (sharded arrays; restored straight into the
  target shardings, so a pod never gathers a ViT-g onto one host);
* ``data``: every process's grain iterator state (one JSON file per process);
* ``config``: the run's config as JSON, for humans and for ``--mode=export``.

Saves are asynchronous; the latest ``keep`` checkpoints are kept, plus the best
one by ``best_metric`` when the run reports it.
"""

import json

from absl import logging
import grain
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


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

  def restore(self, abstract_state, data_iterator, step: int | None = None):
    """Restores ``step`` (default: latest) into the shardings of ``abstract_state``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings
    (from ``jax.eval_shape`` + the sharding rules). The data iterator is
    restored in place. Returns ``(state, step)``.
    """
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self._manager.directory}')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info('restored checkpoint at step %d from %s', step, self._manager.directory)
    return restored['state'], step

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

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
