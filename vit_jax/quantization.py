"""int8 quantization with qwix: post-training (PTQ) and quantization-aware (QAT).

Every matmul kernel that `config.quantization.rules` selects becomes int8,
symmetric, one float32 scale per output channel (qwix's `absmax`
calibration). Activations entering those products are int8 too, so the dots
run int8 x int8 -> int32 (`activations='dynamic'`: a scale per token computed
at run time; `'static'`: scales fixed from calibration examples;
`'none'`: weight-only, the product runs in float on the dequantized kernel).
LayerNorm, softmax, GELU, the residual stream and the loss stay float.

The rules are a regex over '/'-joined *module* paths (the syntax of
vit_jax.param_rules, fully matched), e.g. `Transformer/.*` or `.*/MlpBlock_3/.*`.
Some products stay float whatever the rules say, because int8 cannot hold
them faithfully or qwix cannot see a weight in them (`ALWAYS_FLOAT`):
attention's q.k and p.v (two activations, no weight), AFNO's complex
spectral MLP, and the weight-standardised convolutions of a hybrid's ResNet
stem (their kernel is computed from the parameter at run time).
`quantization.head=False` keeps the classifier float as well.

qwix intercepts `jax.lax.dot_general`, `jnp.einsum`, `jnp.dot`, convolutions
and flax's `promote_dtype` inside the model's `__call__`: that is why the
patch embedding and the conv stem compute with `jnp.dot` after
`promote_dtype`. It cannot quantize an `nn.scan` of blocks for PTQ: the tools
unroll scanned models first (vit_jax.tools.loading).

QAT (`quantization.qat=True`) trains the float params through qwix's
fake-quantization (int8 rounding in the forward pass, straight-through
gradients), with activation ranges taken per batch; the params stay float,
so a QAT run checkpoints and resumes like any other, and
`python -m vit_jax.tools.quantize` turns it into the int8 file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import config_checks
from vit_jax import param_rules
from vit_jax.config_checks import ConfigError
from vit_jax.config_checks import require

PyTree = Any
Qwix = Any  # The qwix module, imported on first use (`_qwix`).

ACTIVATIONS = ('dynamic', 'static', 'none')
# (module path regex, why its products stay float), checked before the rules.
ALWAYS_FLOAT = (
    (r'(.*/)?MultiHeadDotProductAttention_\d+',
     "attention's q.k and p.v products: two activations, no weight"),
    (r'(.*/)?AFNO2D_\d+', "AFNO's spectral MLP: complex-valued products"),
    (r'conv_root|block\d+/unit\d+/conv\w*',
     'weight-standardised ResNet convolutions: the kernel is computed at run '
     'time'),
)
HEAD = 'head'
_OPS = ('dot_general', 'einsum', 'dot')
_CONV = 'conv_general_dilated'


def _qwix() -> Qwix:
  """qwix, imported here so that configs and checks never need it (a GPU
  image may lack it)."""
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('int8 quantization needs qwix: pip install '
                      'qwix==0.1.8 (requirements.txt)') from e
  return qwix


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad `config.quantization` key.

  Which modules the rules select needs the model: `check_rules_select`.
  """
  q = config.quantization
  require(isinstance(q.qat, bool),
          f'config.quantization.qat must be True or False, got {q.qat!r}')
  require(isinstance(q.head, bool),
          f'config.quantization.head must be True or False, got {q.head!r}')
  config_checks.one_of(q.activations, ACTIVATIONS, 'quantization.activations')
  config_checks.positive_int(q.calibration_examples,
                             'quantization.calibration_examples')
  require(isinstance(q.rules, str) and q.rules,
          'config.quantization.rules must be a non-empty regex over module '
          f"paths (e.g. '.*'), got {q.rules!r}")
  param_rules.compile_rule('quantization.rules', q.rules)
  model = config.get('model') or {}  # The quantize tool checks `quantization` alone.
  require(not (q.qat and model.get('precision') == 'mixed_bf16'),
          "config.quantization.qat: QAT fake-quantizes the products in int8, "
          "which model.precision='mixed_bf16' would run in bf16 instead; use "
          "model.precision='float32' (or 'bfloat16') for a QAT run")


def kernel_modules(params: PyTree) -> list[str]:
  """Module paths of every matmul/conv kernel in `params` ('/'-joined)."""
  names = traverse_util.flatten_dict(params, sep='/')
  return sorted({n.rsplit('/', 1)[0] for n in names
                 if n.endswith('/kernel') and np.ndim(names[n]) >= 2})


def _always_float(module: str, head: bool) -> bool:
  if not head and module == HEAD:
    return True
  return any(re.fullmatch(p, module) for p, _ in ALWAYS_FLOAT)


def selected_modules(qcfg: ml_collections.ConfigDict, params: PyTree) -> list[str]:
  """The modules whose kernels the rules turn into int8."""
  return [m for m in kernel_modules(params)
          if re.fullmatch(qcfg.rules, m) and not _always_float(m, qcfg.head)]


def check_rules_select(qcfg: ml_collections.ConfigDict, params: PyTree) -> None:
  """Raises ConfigError if the rules select no kernel of the model's `params`
  (abstract params suffice: nothing is computed)."""
  if not selected_modules(qcfg, params):
    modules = kernel_modules(params)
    raise ConfigError(
        f'config.quantization.rules {qcfg.rules!r} selects no module with a '
        f'kernel to quantize; module paths look like {modules[:3]} (attention '
        'products, AFNO spectral MLPs and ResNet stem convolutions always stay '
        'float).')


def qwix_rules(qcfg: ml_collections.ConfigDict, *, static: bool = False
               ) -> list[Any]:
  """The ordered qwix rules: the always-float modules first, then `rules`.

  `static` asks for static activation scales (calibration, then PTQ); the
  QAT step uses per-batch ranges.
  """
  qwix = _qwix()
  float_paths = [p for p, _ in ALWAYS_FLOAT] + ([] if qcfg.head else [HEAD])
  rules = [qwix.QuantizationRule(module_path=p) for p in float_paths]
  acts = None if qcfg.activations == 'none' else 'int8'
  # qwix quantizes a convolution only with int8 inputs as well.
  ops = _OPS + ((_CONV,) if acts else ())
  rules.append(qwix.QuantizationRule(
      module_path=qcfg.rules, op_names=ops, weight_qtype='int8',
      act_qtype=acts, act_static_scale=static if acts else None))
  return rules


def qat_model(model: nn.Module, qcfg: ml_collections.ConfigDict) -> nn.Module:
  """`model` with fake-quantized int8 products (straight-through gradients);
  the same params as `model`."""
  qwix = _qwix()
  return qwix.quantize_model(model, qwix.QtProvider(qwix_rules(qcfg)))


def ptq_model(model: nn.Module, qcfg: ml_collections.ConfigDict) -> nn.Module:
  """`model` that runs int8 products on the params `quantize_params` returns."""
  static, qwix = qcfg.activations == 'static', _qwix()
  if getattr(model, 'precision', 'float32') == 'mixed_bf16':
    # int8 products replace the bf16 ones; the rest is float32 in both.
    model = model.clone(precision='float32')
  return qwix.quantize_model(model, qwix.PtqProvider(qwix_rules(qcfg, static=static)))


def abstract_quantized_params(model: nn.Module, qcfg: ml_collections.ConfigDict,
                              image_shape: tuple[int, int, int]) -> PyTree:
  """The PTQ model's params as shapes: int8 kernels (qwix `WithAux`) where
  the rules apply, static activation scales, float everywhere else."""
  ptq = ptq_model(model, qcfg)
  return jax.eval_shape(lambda: ptq.init(
      jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32)))['params']


def calibrate(model: nn.Module, params: PyTree, qcfg: ml_collections.ConfigDict,
              images: Iterable[np.ndarray]) -> PyTree:
  """Static activation ranges: qwix's `quant_stats` averaged over `images`
  (an iterable of float32 [batch, h, w, c] batches)."""
  qwix = _qwix()
  # One model (and provider) per trace: a provider keeps per-trace state.
  qt = lambda: qwix.quantize_model(
      model, qwix.QtProvider(qwix_rules(qcfg, static=True)))

  @jax.jit
  def update(params, stats, batch):
    _, new = qt().apply({'params': params, 'quant_stats': stats}, batch,
                        mutable=['quant_stats'])
    return new['quant_stats']

  stats = None
  for batch in images:
    if stats is None:
      stats = jax.jit(lambda x: qt().init(jax.random.key(0), x))(
          batch[:1])['quant_stats']
    stats = update(params, stats, jnp.asarray(batch))
  if stats is None:
    raise ValueError('static calibration got no examples')
  return stats


def quantize_params(model: nn.Module, params: PyTree,
                    qcfg: ml_collections.ConfigDict,
                    image_shape: tuple[int, int, int],
                    calibration: Iterable[np.ndarray] | None = None
                    ) -> tuple[nn.Module, PyTree]:
  """Post-training quantization: (the PTQ model, its int8 params).

  `model` must be unrolled (no `scan_layers`). With
  `activations='static'` the activation scales come from `calibration`.
  """
  if getattr(model, 'scan_layers', False):
    raise ValueError('post-training quantization needs an unrolled model '
                     '(scan_layers=False); unstack the blocks first '
                     '(vit_jax.checkpoint.layouts.unstack_encoder_blocks)')
  check_rules_select(qcfg, params)
  stats = {}
  if qcfg.activations == 'static':
    if calibration is None:
      raise ValueError("activations='static' needs calibration images")
    stats = calibrate(model, params, qcfg, calibration)
  abstract = abstract_quantized_params(model, qcfg, image_shape)
  qparams = _qwix().quantize_params(jax.tree.map(jnp.asarray, params), abstract,
                                 stats)
  return ptq_model(model, qcfg), qparams
