"""Train and eval iterators: host-local numpy batches.

Train batches are `{'image': float32 [B, S, S, C] in [-1, 1], 'label': int32
[B]}` (random erasing's noise boxes, when on, may leave [-1, 1]); eval batches
add `'mask': bool [B]` (False on padding). `B` is the local (per-process)
batch, `S = config.input.image_size`, `C = config.input.channels`.

Training stream (see order.py for the position arithmetic). The example at
global position `g` is chosen and augmented as a function of
`(config.seed, g)`, and process `p` of `P` owns rows `[p*B, (p+1)*B)` of each
global batch, so runs are bit-for-bit repeatable, resume exactly at any step,
and give the same global batches for any process count. Two ways to pick the
example at `g`:

  * Indexed (`config.input.cache`, or image folders): each epoch is a full
    pseudorandom permutation, computed per index. A process touches only its
    own examples; resuming at any step is O(1). With `config.input.cache` every
    process decodes the whole split once at start-up (P-fold decode work,
    then none), and `config.input.shuffle_buffer` is not used.
  * Streamed (TFDS with `config.input.cache=False`, for data too big for memory):
    each epoch reads the split's shards in a seeded order and permutes each
    window of `config.input.shuffle_buffer` records. Every process reads every
    serialized record (P-fold read IO, no decode) and then parses, decodes
    and augments only its own share. Reading is cheap next to decoding, and
    this keeps batches independent of P. Resuming skips the serialized
    records of the current epoch: at most one epoch of reading.

The two orders differ, so toggling `config.input.cache` on a TFDS dataset changes
the batches (each is deterministic); for image folders it does not.

Eval streams every example of a split exactly once across processes, in a
fixed order; the last batches are padded, and every process yields the same
number of batches (`num_eval_batches`), so collectives never hang.
"""

import math
from collections.abc import Iterator

import numpy as np

from vit_jax.data import cache
from vit_jax.data import order
from vit_jax.data import preprocess
from vit_jax.data import sources
from vit_jax.data.tf_runtime import tf

Batch = dict[str, np.ndarray]
_AUTOTUNE = tf.data.AUTOTUNE


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep element order.
  # No autotuning: parallel maps use one call per core, prefetch is
  # config.input.prefetch. On a 2-core CPU the autotuner's own thread took CPU
  # from the train step, and deleting an iterator waited for its sleeping
  # optimisation loop at the end of every run (docs/benchmarks.md).
  options.autotune.enabled = False
  return options


def _check_batching(local_batch_size, process_index, process_count):
  if local_batch_size < 1:
    raise ValueError(f'local_batch_size={local_batch_size} must be >= 1.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')


def _streamed_positions(source: sources.Source, split: str, num_examples: int,
                        seed: int, window: int,
                        start_position: int) -> tf.data.Dataset:
  """`(g, record)` for g >= start_position of the streamed training order."""

  def epoch_records(epoch):
    records = source.records(split, order.shard_key(seed, epoch))
    return order.window_shuffle(records, window, order.window_key(seed, epoch))

  first_epoch, skip = divmod(start_position, num_examples)
  records = tf.data.Dataset.counter(first_epoch).flat_map(epoch_records)
  return tf.data.Dataset.zip(tf.data.Dataset.counter(start_position),
                             records.skip(skip))


def train_iterator(config, *, local_batch_size: int, process_index: int = 0,
                   process_count: int = 1,
                   start_step: int = 0) -> Iterator[Batch]:
  """Infinite iterator of this process's training batches from `start_step`.

  Args:
    config: the run config (dataset, data_dir, train_split, image_size,
      channels, pp, seed, cache, shuffle_buffer, prefetch).
    local_batch_size: B, this process's rows of each global batch.
    process_index: p in [0, process_count).
    process_count: P; the global batch is B * P.
    start_step: first step to yield; equals skipping `start_step` batches of
      the iterator started at 0.

  Yields:
    `{'image': float32 [B, S, S, C] in [-1, 1], 'label': int32 [B]}`.
  """
  _check_batching(local_batch_size, process_index, process_count)
  source = sources.open_source(config)
  split, seed = config.input.train_split, int(config.seed)
  num_examples = source.split_size(split)
  if num_examples == 0:
    raise ValueError(f'Train split {split!r} of {source.name!r} is empty.')
  augment = preprocess.train_preprocess(config.pp, config.input.image_size,
                                        config.input.channels)

  def prepare(position, example):
    image = augment(example['image'], order.example_seed(seed, position))
    return {'image': image, 'label': example['label']}

  if config.input.cache:
    fetch = cache.decode_split(source, split).lookup()
  elif (records := source.lookup(split)) is not None:
    fetch = lambda index: source.decode(records(index))
  else:
    fetch = None

  if fetch is not None:  # Indexed.
    ds = order.local_positions(start_step, local_batch_size, process_index,
                               process_count)
    index = lambda g: order.shuffled_index(g, num_examples, seed)
    ds = ds.map(lambda g: prepare(g, fetch(index(g))),
                num_parallel_calls=_AUTOTUNE, deterministic=True)
  else:  # Streamed.
    ds = _streamed_positions(source, split, num_examples, seed,
                             config.input.shuffle_buffer,
                             start_step * local_batch_size * process_count)
    ds = ds.filter(lambda g, record: order.is_local(
        g, local_batch_size, process_index, process_count))
    ds = ds.map(lambda g, record: prepare(g, source.decode(record)),
                num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds.prefetch(config.input.prefetch).with_options(_options())
  return ds.as_numpy_iterator()


def eval_iterator(config, split: str, *, local_batch_size: int,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """One pass over `split`: this process's rows of each global eval batch.

  Global eval batch `s` holds positions `[s*B*P, (s+1)*B*P)` of the split in
  its fixed order; positions past the end are padding (`mask` False, zero
  image, label 0). Every process yields exactly
  `num_eval_batches(config, split, B * P)` batches.

  Yields:
    `{'image': float32 [B, S, S, C], 'label': int32 [B], 'mask': bool [B]}`.
  """
  _check_batching(local_batch_size, process_index, process_count)
  source = sources.open_source(config)
  num_examples = source.split_size(split)
  num_batches = math.ceil(num_examples / (local_batch_size * process_count))
  size, channels = config.input.image_size, config.input.channels
  resize = preprocess.eval_preprocess(config.pp, size, channels)

  def prepare(position, record):
    del position
    example = source.decode(record)
    return {'image': resize(example['image']), 'label': example['label'],
            'mask': tf.constant(True)}

  ds = source.records(split).enumerate().filter(
      lambda g, record: order.is_local(g, local_batch_size, process_index,
                                       process_count))
  ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE, deterministic=True)
  padding = num_batches * local_batch_size - order.local_count(
      num_examples, local_batch_size, process_index, process_count)
  ds = ds.concatenate(tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, channels], tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False)}).repeat(padding))
  ds = ds.batch(local_batch_size).prefetch(config.input.prefetch)
  return ds.with_options(_options()).as_numpy_iterator()
