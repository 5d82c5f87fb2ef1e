"""Per-process grain input pipelines, checkpointable, handing global jax.Arrays to the step.

The pipeline knows no training method: it reads this process's data shard,
shuffles, repeats and decodes, then applies the recipe's host batch function
(``Recipe.host_batches``: multi-crop + masks for DINOv2, 3-Augment + mixing
for DeiT-III ...), which turns decoded examples into batches. API::

  layout = sharded.batch_layout(global_batch)           # parallel/batch.py
  it = build_train_pipeline(config, recipe.host_batches, layout=layout, mesh=mesh)
  batch = next(it)       # dict of global jax.Arrays sharded over the mesh batch axes
                         # (per-process numpy arrays when mesh is None)
  state = it.get_state() # small JSON dict; Orbax: grain.checkpoint.CheckpointSave(it) /
  it.set_state(state)    #   CheckpointRestore(it). Resumes with exactly the batches an
  it.close()             #   uninterrupted run would see, for any number of workers.

  ev = build_eval_pipeline(config, split='val', layout=..., mode='center' | 'native')
  for batch in ev: ...   # 'image', 'label', 'valid': the same number of full batches on
                         # every process; padding and undecodable images have valid == 0.
                         # 'native' yields one image at a time at native resolution (LOST).

The batch layout (``parallel/batch.py``) decides which examples a process
reads: ``layout.shard_index`` / ``num_shards`` (processes holding the same
rows, e.g. across a ``tensor`` axis, read the same shard with the same
seeds), and the per-process batch is ``layout.per_process_batch_size`` rows,
which may be several blocks of the global batch (a TPU torus); the rows of a
process's blocks are consecutive examples of its shard, in global-row order.
Without a layout: the mesh's layout for ``data.batch_axes`` when a mesh is
given, else one shard per process (``shard_index``/``num_shards``, or their
older names ``process_index``/``process_count``, override).

``skipped`` (per example) counts undecodable files replaced to make it.

Config keys (``config.seed``):
  data.*     source, name, split, eval_split, data_dir, tfds_image_decoding, path, embedded
             (see sources.py); batch_size (global), eval_batch_size (global, default
             batch_size), shuffle, num_epochs (None = forever), num_workers (grain worker
             processes, 0 = in-process), worker_buffer_size (batches per worker),
             read_threads (threads per worker), device_prefetch (batches), batch_axes
  augment.*  eval only: mean, std (default ImageNet), eval_resize_size, eval_crop_size
             (default 224 and crop x 256/224), native_max_size; masking.patch_size (native)
"""

import collections
import math
import zlib

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from vitreg_jax import config as config_lib
from vitreg_jax.data import decode
from vitreg_jax.data import sources
from vitreg_jax.data import transforms
from vitreg_jax.parallel import batch as batch_lib

EVAL_AUGMENT_KEYS = ('mean', 'std', 'eval_resize_size', 'eval_crop_size', 'native_max_size')
# Streams of randomness of the train pipeline; indices fixed so seeds never move.
STREAMS = ('shuffle', 'augment', 'masks')


def section(config, name, defaults):
  """``config.<name>`` merged over ``defaults``; unknown keys fail naming the valid ones."""
  given = config.get(name) if name in config else None
  given = dict(given.to_dict() if hasattr(given, 'to_dict') else (given or {}))
  config_lib.check_keys(given, defaults, name)
  return ml_collections.ConfigDict({**defaults, **given})


def _data(config):
  return section(config, 'data', config_lib.DATA)


def _stream_index(name: str) -> int:
  return STREAMS.index(name) if name in STREAMS else zlib.crc32(name.encode()) | 1 << 32


def stream_seeds(seed, shard_index):
  """``name -> seed`` of this shard's random streams (``Recipe.host_batches`` draws from it)."""
  return lambda name: _stream_seed(seed, shard_index, _stream_index(name))


def _stream_seed(seed, shard_index, stream):
  """Independent 32-bit seeds per (seed, data shard, stream).

  Shards never share randomness; processes that read the same shard (replicas
  across a ``tensor`` axis) draw the same crops and masks, as they must.
  """
  return int(np.random.SeedSequence([int(seed), int(shard_index), stream]).generate_state(1)[0])


def _data_shard(shard_index, num_shards, process_index, process_count, mesh, data):
  """(shard_index, num_shards): as given (or under the old names), from the mesh, or per process."""
  if process_index is not None or process_count is not None:
    if shard_index is not None or num_shards is not None:
      raise ValueError('give shard_index/num_shards or their old names process_index/'
                       'process_count, not both')
    shard_index, num_shards = process_index, process_count
  if (shard_index is None) != (num_shards is None):
    raise ValueError(f'shard_index and num_shards go together, got {shard_index} and '
                     f'{num_shards}')
  if shard_index is not None:
    if not 0 <= shard_index < num_shards:
      raise ValueError(f'shard_index {shard_index} is outside [0, num_shards={num_shards})')
    return shard_index, num_shards
  if mesh is not None:  # the shard pattern does not depend on the batch size: probe with
    sharding = batch_sharding(mesh, data.batch_axes)  # one row per device
    layout = batch_lib.layout_from_sharding(sharding, sharding.num_devices)
    return layout.shard_index, layout.num_shards
  return jax.process_index(), jax.process_count()


def _per_process(global_batch, num_shards, what):
  if global_batch % num_shards:
    raise ValueError(f'data.{what} ({global_batch}) must be divisible by the number of '
                     f'data shards ({num_shards})')
  return global_batch // num_shards


def _ensure_absl_flags_parsed():
  """grain reads absl flags; scripts that never ran ``app.run`` have not parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def batch_sharding(mesh, batch_axes=('data', 'fsdp')):
  """Leading-axis sharding over those of ``batch_axes`` the mesh has (replicated elsewhere)."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f'mesh axes {mesh.axis_names} contain none of the batch axes {tuple(batch_axes)}')
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


def to_global_batch(batch, mesh, batch_axes=('data', 'fsdp')):
  """Per-process numpy batch -> global jax.Arrays (each process holds its rows)."""
  sharding = batch_sharding(mesh, batch_axes)
  return jax.make_array_from_process_local_data(
      jax.tree.map(lambda _: sharding, batch), batch)


def _read_options(data):
  return grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=max(1, data.read_threads))


def _iterate(batched: grain.MapDataset, data):
  """A grain iterator over ``batched``: in-process, or sharded over worker processes."""
  ds = batched.to_iter_dataset(_read_options(data))
  if data.num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
  return iter(ds)


class TrainIterator(grain.DatasetIterator):
  """Endless batches with a resumable position; optionally prefetched onto a mesh.

  Every batch is an element of one indexable grain dataset (batch ``i`` is a
  pure function of the seed and ``i``), so the state is just the number of
  batches handed out plus a description of the stream; restoring restarts the
  workers at that batch. The state is independent of the worker count and of
  the device prefetch depth.
  """

  def __init__(self, batched: grain.MapDataset, *, description: str, data, mesh=None):
    super().__init__()
    self._batched = batched
    self._description = description
    self._data = data
    self._mesh = mesh
    self._next_batch = 0
    self._grain_iter = None
    self._ready = collections.deque()  # batches fetched (and put on devices) but not yet returned

  @property
  def description(self):
    return self._description

  def start_prefetch(self):
    if self._grain_iter is None:
      self._grain_iter = _iterate(self._batched[self._next_batch + len(self._ready):], self._data)

  def _fetch(self):
    batch = next(self._grain_iter)
    if self._mesh is not None:
      batch = to_global_batch(batch, self._mesh, self._data.batch_axes)  # async host->device copy
    self._ready.append(batch)

  def __next__(self):
    self._assert_not_closed()
    self.start_prefetch()
    depth = max(1, self._data.device_prefetch if self._mesh is not None else 1)
    try:
      while len(self._ready) < depth:
        self._fetch()
    except StopIteration:
      if not self._ready:
        raise
    self._next_batch += 1
    return self._ready.popleft()

  def get_state(self):
    return {'next_batch': self._next_batch, 'pipeline': self._description}

  def set_state(self, state):
    if state.get('pipeline') != self._description:
      raise ValueError('the saved input-pipeline state belongs to a different data stream:\n'
                       f'  saved:   {state.get("pipeline")}\n  current: {self._description}\n'
                       'resume with the same data source, seed, batch size and process layout')
    self._stop()
    self._next_batch = int(state['next_batch'])

  def _stop(self):
    if self._grain_iter is not None:
      self._grain_iter.close()
    self._grain_iter = None
    self._ready.clear()

  def close(self):
    if not self._closed:
      self._stop()
    super().close()

  def __str__(self):
    return f'TrainIterator({self._description})'


def _layout_shard(layout, shard_index, num_shards, process_index, process_count, mesh, data):
  """(shard_index, num_shards, blocks-per-process batch) from the layout, or as before."""
  if layout is not None:
    if any(v is not None for v in (shard_index, num_shards, process_index, process_count)):
      raise ValueError('give a batch layout or shard_index/num_shards, not both')
    if layout.global_batch_size != data.batch_size:
      raise ValueError(f'the batch layout is for a global batch of {layout.global_batch_size}, '
                       f'data.batch_size is {data.batch_size}')
    return layout.shard_index, layout.num_shards, layout.per_process_batch_size
  shard_index, num_shards = _data_shard(shard_index, num_shards, process_index, process_count,
                                        mesh, data)
  return shard_index, num_shards, _per_process(data.batch_size, num_shards, 'batch_size')


def build_train_pipeline(config, host_batches, *, layout=None, shard_index=None,
                         num_shards=None, seed=None, mesh=None, process_index=None,
                         process_count=None) -> TrainIterator:
  """Endless training batches made by ``host_batches`` (see the module docstring)."""
  data = _data(config)
  shard_index, num_shards, per_process_batch = _layout_shard(
      layout, shard_index, num_shards, process_index, process_count, mesh, data)
  seed = config.get('seed', 0) if seed is None else seed
  source = sources.make_source(data, data.split)

  examples = grain.MapDataset.source(source)[shard_index::num_shards]
  if len(examples) < per_process_batch:
    raise ValueError(f'data shard {shard_index} has {len(examples)} examples of {source!r}, '
                     f'fewer than one per-process batch ({per_process_batch})')
  seeds = stream_seeds(seed, shard_index)
  if data.shuffle:
    examples = examples.shuffle(seed=seeds('shuffle'))
  examples = examples.repeat(data.num_epochs)
  examples = decode.DecodedDataset(examples, on_error='substitute')
  batched = host_batches(examples, per_process_batch, seeds)
  maker = getattr(host_batches, '__qualname__', type(host_batches).__name__)
  description = (f'{maker} {source!r} process {shard_index}/{num_shards} '
                 f'batch {per_process_batch} seed {seed} shuffle {data.shuffle} '
                 f'epochs {data.num_epochs}')
  return TrainIterator(batched, description=description, data=data, mesh=mesh)


class EvalPipeline:
  """Re-iterable evaluation batches (fresh workers per pass); see the module docstring."""

  def __init__(self, batched, *, data, mesh, num_batches, num_examples):
    self._batched, self._data, self._mesh = batched, data, mesh
    self.num_batches, self.num_examples = num_batches, num_examples

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    iterator = _iterate(self._batched, self._data)
    try:
      for batch in iterator:
        yield batch if self._mesh is None else to_global_batch(batch, self._mesh, self._data.batch_axes)
    finally:
      iterator.close()


def build_eval_pipeline(config, *, split=None, layout=None, shard_index=None, num_shards=None,
                        mode='center', mesh=None, process_index=None,
                        process_count=None) -> EvalPipeline:
  """Evaluation batches: ``'center'`` resize + centre crop, or ``'native'`` (LOST) one by one.

  A ``layout`` (of the eval batch) says which shard this process reads, as for training.
  """
  if mode not in ('center', 'native'):
    raise ValueError(f"eval mode must be 'center' or 'native', got {mode!r}")
  data = _data(config)
  augment = config.get('augment') or {}
  aug = {k: augment.get(k) for k in EVAL_AUGMENT_KEYS}
  if layout is not None:
    shard_index, num_shards = layout.shard_index, layout.num_shards
  else:
    shard_index, num_shards = _data_shard(shard_index, num_shards, process_index,
                                          process_count, mesh if mode == 'center' else None, data)
  source = sources.make_source(data, split or data.eval_split)
  mean = aug['mean'] or transforms.IMAGENET_MEAN
  std = aug['std'] or transforms.IMAGENET_STD
  if mode == 'native':
    per_process_batch = 1
    patch_size = (config.get('masking') or {}).get('patch_size', 14)
    transform = transforms.EvalNative(patch_size=patch_size, mean=mean, std=std,
                                      max_size=aug['native_max_size'])
    mesh = None
  else:
    per_process_batch = _per_process(data.eval_batch_size or data.batch_size, num_shards,
                                     'eval_batch_size')
    crop = aug['eval_crop_size'] or 224
    resize = aug['eval_resize_size'] or round(crop * 256 / 224)
    transform = transforms.EvalCenterCrop(resize_size=resize, crop_size=crop, mean=mean, std=std)
  num_batches = math.ceil(len(source) / (num_shards * per_process_batch))
  padded = sources.PaddedSource(source, num_batches * per_process_batch * num_shards)
  ds = grain.MapDataset.source(padded)[shard_index::num_shards]
  ds = decode.DecodedDataset(ds, on_error='invalid').map(transform)
  ds = ds.batch(per_process_batch, drop_remainder=True)
  return EvalPipeline(ds, data=data, mesh=mesh, num_batches=num_batches, num_examples=len(source))
