"""Which example goes where: global positions, shuffles and per-example seeds.

The training stream is one infinite sequence of examples shared by all
processes. The example at *global position* `g = step * global_batch + row`
is fully determined by `(config.seed, g)`:

  * its dataset index: epoch `g // n`, slot `g % n` of that epoch's
    permutation (`tf.random.experimental.index_shuffle`, so no permutation is
    ever materialised and jumping to any position is O(1));
  * its augmentation seed: `stateless_fold_in(seed, g)`.

Only stateless TF random ops are used, so nothing depends on thread scheduling
or on TF's global seed. Process `p` of `P`, with local batch `B`, owns rows
`[p * B, (p + 1) * B)` of each global batch of `P * B` examples; the global
batch at a step is therefore the same examples in the same order for any `P`.
"""

from vit_jax.data.tf_runtime import tf

# Salts keep the random streams for different purposes independent.
_SALT_ORDER = 0x5EED0
_SALT_AUGMENT = 0x5EED1
_SALT_SHARDS = 0x5EED2
_SALT_WINDOW = 0x5EED3


def _key(seed: int, salt: int) -> tf.Tensor:
  """A stateless-RNG key (int64 [2]) for one purpose of one run."""
  return tf.constant([seed, salt], tf.int64)


def fold_in(key: tf.Tensor, data: tf.Tensor | int) -> tf.Tensor:
  """A new int64 [2] key derived from `key` and an integer (epoch, position)."""
  return tf.random.experimental.stateless_fold_in(
      key, tf.cast(data, tf.int64))


def example_seed(seed: int, position: tf.Tensor) -> tf.Tensor:
  """Augmentation seed (int64 [2]) of the example at a global position."""
  return fold_in(_key(seed, _SALT_AUGMENT), position)


def shuffled_index(position: tf.Tensor, num_examples: int,
                   seed: int) -> tf.Tensor:
  """Dataset index (int64 scalar) of the example at a global position.

  Each epoch is a fresh pseudorandom permutation of `[0, num_examples)`.
  """
  position = tf.cast(position, tf.int64)
  epoch, slot = position // num_examples, position % num_examples
  return tf.random.experimental.index_shuffle(
      slot, fold_in(_key(seed, _SALT_ORDER), epoch),
      tf.constant(num_examples - 1, tf.int64))


def shard_key(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  """Key that orders a streamed split's shards in one epoch."""
  return fold_in(_key(seed, _SALT_SHARDS), epoch)


def window_key(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  """Key of the window shuffles of a streamed split in one epoch."""
  return fold_in(_key(seed, _SALT_WINDOW), epoch)


def is_local(position: tf.Tensor, local_batch_size: int, process_index: int,
             process_count: int) -> tf.Tensor:
  """Whether this process owns the global position (a bool scalar)."""
  row = position % (local_batch_size * process_count)
  return row // local_batch_size == process_index


def local_positions(start_step: int, local_batch_size: int, process_index: int,
                    process_count: int) -> tf.data.Dataset:
  """Infinite int64 dataset of this process's global positions, in order.

  Element `k` is row `k % B` of this process's share of step
  `start_step + k // B`.
  """
  global_batch = local_batch_size * process_count

  def position(k):
    step = start_step + k // local_batch_size
    return (step * global_batch + process_index * local_batch_size
            + k % local_batch_size)

  return tf.data.Dataset.counter(0).map(position)


def local_count(num_examples: int, local_batch_size: int, process_index: int,
                process_count: int) -> int:
  """How many of positions `[0, num_examples)` a process owns."""
  global_batch = local_batch_size * process_count
  full, rest = divmod(num_examples, global_batch)
  last = min(max(rest - process_index * local_batch_size, 0), local_batch_size)
  return full * local_batch_size + last


def window_shuffle(ds: tf.data.Dataset, window: int,
                   key: tf.Tensor) -> tf.data.Dataset:
  """Permutes each run of `window` consecutive elements, statelessly.

  A stand-in for `Dataset.shuffle` whose result is a pure function of `key`
  (the tf.data shuffle also depends on TF's global seed). Elements move only
  within their window, so combine it with a shard-order shuffle.
  """

  def permute(index, elements):
    size = tf.shape(tf.nest.flatten(elements)[0])[0]
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(size), fold_in(key, index))
    return tf.nest.map_structure(lambda t: tf.gather(t, perm), elements)

  return ds.batch(window).enumerate().map(permute).unbatch()
