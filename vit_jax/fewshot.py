"""Few-shot linear evaluation on pre-logit features (`config.fewshot`).

A representation is judged long before a fine-tune by how well a linear map on
its features separates classes from a handful of examples each. For every
dataset of `config.fewshot.datasets` the pre-logit features of two fixed
subsets are computed once per evaluation (the train and test split of
`config.fewshot`, jitted and sharded over the mesh, every process taking part);
then for each shot count and seed, `shots` examples per class are drawn from
the train features and a closed-form ridge regression to +-1 targets is fit
(features standardised by the drawn examples' mean and deviation, a constant
bias feature, l2 `config.fewshot.l2_reg`: the recipe of big_vision's few-shot
evaluator). The test top-1, averaged over seeds, is logged as
`fewshot_<dataset>_<shots>shot`.

Everything a run can get wrong (an unknown dataset or split, an empty split,
more shots than a class has examples) is found by `prepare`, before the
train step compiles. `python -m vit_jax.tools.linear_probe` runs the same
fits on features it caches on disk.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vit_jax import config_checks
from vit_jax import data
from vit_jax import evaluation
from vit_jax import models
from vit_jax import parallel
from vit_jax.config_checks import require

# The bias feature's value: large, so its weight is all but unregularised.
_BIAS_FEATURE = 100.0
_STD_EPS = 1e-5


def datasets(config: ml_collections.ConfigDict) -> list[str]:
  """The few-shot datasets of a training config ([] when few-shot is off)."""
  names = config.fewshot.datasets
  if isinstance(names, str):
    names = names.split(',')
  return [n.strip() for n in names if n.strip()]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a `config.fewshot` section that cannot work (no IO)."""
  fs = config.fewshot
  require(isinstance(fs.datasets, (str, tuple, list)),
          f'config.fewshot.datasets must be a comma-separated string, got '
          f'{fs.datasets!r}')
  shots = fs.shots
  require(isinstance(shots, (tuple, list)) and shots and all(
      config_checks.is_int(s) and s > 0 for s in shots),
          f'config.fewshot.shots must be positive integers, got {shots!r}')
  config_checks.positive_int(fs.seeds, 'fewshot.seeds')
  config_checks.finite_positive(fs.l2_reg, 'fewshot.l2_reg')
  require(fs.every is None or (config_checks.is_int(fs.every) and fs.every > 0),
          f'config.fewshot.every must be a positive integer or None (= '
          f'eval_every), got {fs.every!r}')
  for key in ('train_split', 'test_split'):
    require(isinstance(fs[key], str) and fs[key],
            f'config.fewshot.{key} must name a split, got {fs[key]!r}')


def metric_name(dataset: str, shots: int) -> str:
  """'fewshot_fashion_mnist_5shot'; datasets are made name-safe like splits."""
  return f'fewshot_{evaluation.split_name(dataset)}_{shots}shot'


def metric_names(config: ml_collections.ConfigDict) -> list[str]:
  """The names a run's few-shot evaluations log."""
  return [metric_name(d, n) for d in datasets(config) for n in config.fewshot.shots]


# ------------------------------------------------------------ the fits


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` examples of every class in `labels`, drawn by `seed`.

  Depends only on the labels' order and the seed, so every process (and a run
  on any number of them) draws the same examples.
  """
  rng = np.random.default_rng([seed, shots])
  picked = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    if members.size < shots:
      raise ValueError(f'class {label} has {members.size} examples, fewer than '
                       f'{shots} shots')
    picked.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(picked))


@dataclasses.dataclass(frozen=True)
class RidgeFit:
  """Standardised train features, decomposed once for any number of l2 values."""
  mean: np.ndarray
  std: np.ndarray
  features: np.ndarray   # Standardised, with the bias feature; [n, d + 1].
  targets: np.ndarray    # +-1 one-hot; [n, classes].
  eigvals: np.ndarray
  eigvecs: np.ndarray    # Of x x^T ([n, n]) when n < d + 1, else of x^T x.

  @classmethod
  def of(cls, features: np.ndarray, labels: np.ndarray,
         num_classes: int) -> 'RidgeFit':
    x = features.astype(np.float64)
    mean, std = x.mean(0), x.std(0) + _STD_EPS
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=_BIAS_FEATURE)
    targets = 2.0 * np.eye(num_classes)[labels] - 1.0
    gram = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x
    eigvals, eigvecs = np.linalg.eigh(gram)
    return cls(mean, std, x, targets, eigvals, eigvecs)

  def weights(self, l2_reg: float) -> np.ndarray:
    """argmin_w |x w - y|^2 + l2 |w|^2, [d + 1, classes]."""
    q, inv = self.eigvecs, 1.0 / (self.eigvals + l2_reg)
    if q.shape[0] == self.features.shape[0]:  # Dual form: x^T (x x^T + l2)^-1 y.
      return self.features.T @ (q @ (inv[:, None] * (q.T @ self.targets)))
    return q @ (inv[:, None] * (q.T @ (self.features.T @ self.targets)))

  def predict(self, features: np.ndarray, l2_reg: float) -> np.ndarray:
    x = (features.astype(np.float64) - self.mean) / self.std
    x = np.pad(x, ((0, 0), (0, 1)), constant_values=_BIAS_FEATURE)
    return np.argmax(x @ self.weights(l2_reg), axis=1)


def ridge_top1(train: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], num_classes: int,
               l2_regs: Sequence[float]) -> list[float]:
  """Test top-1 of the ridge classifier fit on `train` = (features, labels),
  one per l2 value."""
  fit = RidgeFit.of(*train, num_classes)
  x_test, y_test = test
  return [float(np.mean(fit.predict(x_test, l2) == y_test)) for l2 in l2_regs]


def fewshot_top1(train: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], *, num_classes: int,
                 shots: Sequence[int], seeds: int,
                 l2_regs: Sequence[float]) -> dict[tuple[int, float], float]:
  """(shots, l2) -> test top-1 averaged over `seeds` draws of the train shots."""
  features, labels = train
  results = {}
  for n in shots:
    per_seed = [ridge_top1((features[i], labels[i]), test, num_classes, l2_regs)
                for i in (sample_shots(labels, n, seed) for seed in range(seeds))]
    for l2, top1 in zip(l2_regs, np.mean(per_seed, axis=0)):
      results[(n, l2)] = float(top1)
  return results


# ------------------------------------------------------------ data and features


@dataclasses.dataclass(frozen=True)
class Task:
  """One few-shot dataset, opened and checked."""
  dataset: str
  config: ml_collections.ConfigDict  # The training config reading this dataset.
  num_classes: int
  train_split: str
  test_split: str


def dataset_config(config: ml_collections.ConfigDict,
                   dataset: str) -> ml_collections.ConfigDict:
  """`config` reading `dataset` (same image size, channels and eval preprocessing)."""
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  config.dataset = dataset
  return config


def prepare(config: ml_collections.ConfigDict,
            shots: Sequence[int] | None = None) -> list[Task]:
  """Opens and checks every few-shot dataset of `config` (before any compile).

  Raises:
    ConfigError: an unknown dataset or split, an empty split, or a class of
      the train split with fewer examples than the largest shot count.
  """
  fs = config.fewshot
  shots = fs.shots if shots is None else shots
  tasks = []
  for dataset in datasets(config):
    task_config = dataset_config(config, dataset)
    where = f'config.fewshot dataset {dataset!r}'
    try:
      data.check_config(task_config)
      from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
      source = sources.open_source(task_config)
      sizes = {s: source.split_size(s) for s in (fs.train_split, fs.test_split)}
    except (ValueError, FileNotFoundError) as e:
      raise config_checks.ConfigError(f'{where}: {e}') from None
    for split, size in sizes.items():
      require(size > 0, f'{where}: split {split!r} holds no examples')
    counts = np.bincount(source.labels(fs.train_split),
                         minlength=len(source.class_names))
    short = [f'{source.class_names[c]} ({n})' for c, n in enumerate(counts)
             if n < max(shots)]
    require(not short, f'{where}: {max(shots)} shots, but in '
            f'{fs.train_split!r} these classes have fewer examples: '
            + ', '.join(short[:10]) + (' ...' if len(short) > 10 else ''))
    tasks.append(Task(dataset, task_config, len(source.class_names),
                      fs.train_split, fs.test_split))
  return tasks


def features_model(model_config: ml_collections.ConfigDict) -> Any:
  """The model of a training config without its head: pre-logit features."""
  return models.create_model(model_config, num_classes=None)


def jit_features_step(model: Any, mesh: jax.sharding.Mesh,
                      params_sharding: Any) -> Callable[[Any, Any], Any]:
  """(backbone params, batch) -> (features [B, D], labels, mask) of the global
  batch, replicated: every process gets every row."""

  def features(params, batch):
    out = model.apply({'params': params}, batch['image'], train=False)
    return out, batch['label'], batch['mask']

  return jax.jit(features,
                 in_shardings=(params_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def backbone(params: Any) -> Any:
  """The params without the classifier `head` (what `features_model` takes)."""
  return {k: v for k, v in params.items() if k != 'head'}


def compute_features(features_step: Callable[[Any, Any], Any], params: Any,
                     task_config: ml_collections.ConfigDict, split: str,
                     mesh: jax.sharding.Mesh, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(features float32 [N, D], labels [N]) of every example of `split`, in the
  split's fixed order whatever the process count (padding dropped)."""
  chunks, labels = [], []
  for local in data.eval_iterator(
      task_config, split, local_batch_size=parallel.local_batch_size(batch_size),
      process_index=jax.process_index(), process_count=jax.process_count()):
    out, label, mask = jax.device_get(
        features_step(params, parallel.to_global_batch(local, mesh)))
    chunks.append(out[mask])
    labels.append(label[mask])
  return np.concatenate(chunks).astype(np.float32), np.concatenate(labels)


class Evaluator:
  """`evaluator(params) -> {fewshot_<dataset>_<shots>shot: top-1}` for a run.

  The features step is the training model without its head, sharded like
  the params (the head's sharding dropped); it compiles on first use.
  """

  def __init__(self, config: ml_collections.ConfigDict, tasks: Sequence[Task],
               mesh: jax.sharding.Mesh, params_sharding: Any):
    self._config, self._tasks, self._mesh = config, tuple(tasks), mesh
    self._step = jit_features_step(features_model(config.model), mesh,
                                   backbone(params_sharding))

  def __call__(self, params: Any) -> dict[str, float]:
    fs, results = self._config.fewshot, {}
    for task in self._tasks:
      train, test = (
          compute_features(self._step, backbone(params), task.config, split,
                           self._mesh, self._config.eval.batch_size)
          for split in (task.train_split, task.test_split))
      top1 = fewshot_top1(train, test, num_classes=task.num_classes,
                          shots=fs.shots, seeds=fs.seeds, l2_regs=(fs.l2_reg,))
      results.update({metric_name(task.dataset, n): v
                      for (n, _), v in top1.items()})
    return results
