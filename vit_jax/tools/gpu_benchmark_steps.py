"""gpu_benchmark's steps and the memory each needs: remat only where needed.

Our step is compiled without remat first. It fits when what the compiled
program asks for (XLA's memory analysis: temporaries + arguments + outputs,
the donated state counted once) plus what the device already holds stays
within FIT_FRACTION of the device's memory limit; otherwise it is compiled
again with the next policy of REMAT_FALLBACK. The first policy that fits then
runs one step: an allocation the analysis did not foresee (another
framework's memory, fragmentation) surfaces there as RESOURCE_EXHAUSTED, and
that too moves on to the next policy. The last policy runs even over the
limit, since the analysis is an estimate; only running out of memory there
fails the row. timm's step takes the same path with its own two settings (as
it is, then timm's gradient checkpointing) and no estimate, only the first
step; it is built after ours, so it gets what our step leaves.
"""

import copy
import dataclasses
import gc
import sys
import traceback
from typing import Any, Callable

import jax
import ml_collections

from vit_jax.tools import bench_timm
from vit_jax.tools import benchmark

# Of the device's memory limit; the rest is headroom for what the analysis
# does not count (allocator fragmentation, the runtime's own buffers).
FIT_FRACTION = 0.9
# Cheapest recomputation first: 'dots_saveable' keeps every matmul output and
# reruns only elementwise ops; 'full' keeps each block's input alone.
REMAT_FALLBACK = ('none', 'dots_saveable', 'full')
TIMM_REMAT = ('none', 'full')  # timm: as it is, then set_grad_checkpointing.
# The custom call XLA keeps for cuDNN's fused attention.
CUDNN_ATTENTION = '__cudnn$fmha'
# What the device runs out of, in the words of XLA and of torch.
_OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'out of memory')


@dataclasses.dataclass
class Step:
  """A built step: run(n) does n steps; need_bytes is its estimated footprint
  on the device (None where unknown: no analysis, or not a JAX step)."""
  run: Callable[[int], int]
  facts: dict[str, Any]
  need_bytes: int | None = None


def is_out_of_memory(error: BaseException) -> bool:
  """True for XLA's RESOURCE_EXHAUSTED and torch's OutOfMemoryError."""
  return (type(error).__name__ == 'OutOfMemoryError' or
          any(marker in str(error) for marker in _OOM_MARKERS))


def memory_limit(override: int | None = None) -> tuple[int | None, str]:
  """(bytes the device may use, where that number came from: 'flag',
  'device' or 'none').

  `override` (the tool's --memory_limit_bytes) wins; otherwise the allocator's
  `bytes_limit`, which a CPU does not report (None: everything fits).
  """
  if override:
    return override, 'flag'
  limit = (jax.devices()[0].memory_stats() or {}).get('bytes_limit')
  return (limit, 'device') if limit else (None, 'none')


def bytes_in_use() -> int:
  """What device 0 holds now (0 where the backend does not say)."""
  return (jax.devices()[0].memory_stats() or {}).get('bytes_in_use', 0)


def program_bytes(compiled: jax.stages.Compiled) -> int | None:
  """Temporaries + arguments + outputs of `compiled`, donated buffers once
  (None where the backend gives no analysis)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return (stats.temp_size_in_bytes + stats.argument_size_in_bytes +
          stats.output_size_in_bytes - stats.alias_size_in_bytes)


def fits(need_bytes: int | None, limit_bytes: int | None) -> bool:
  return need_bytes is None or limit_bytes is None or (
      need_bytes <= FIT_FRACTION * limit_bytes)


def first_that_fits(build: Callable[[str], Step], policies: tuple[str, ...],
                    limit_bytes: int | None,
                    release: Callable[[], None] = gc.collect
                    ) -> tuple[Step, str, list[dict[str, Any]]]:
  """(step, its policy, every attempt) for the first of `policies` that fits.

  build(policy) compiles (or builds) the step. Each attempt records its
  policy, need_bytes, whether it fitted and, if it ran out of memory, the
  error's first line. release() runs after a discarded attempt, once nothing
  refers to it, so its memory is free for the next. Raises MemoryError when
  the last policy runs out of memory too; errors other than running out of
  memory propagate at once.
  """
  attempts = []
  for i, policy in enumerate(policies):
    attempt = {'remat': policy}
    attempts.append(attempt)
    try:
      step = build(policy)
      attempt.update(need_bytes=step.need_bytes,
                     fits=fits(step.need_bytes, limit_bytes))
      if attempt['fits'] or i == len(policies) - 1:
        step.run(1)  # The first step allocates all that the program asks for.
        return step, policy, attempts
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      attempt['error'] = str(e).strip().splitlines()[0][:200]
    step = None  # Outside the handler: no traceback holds it any more.
    release()
  raise MemoryError(f'out of memory with each of {", ".join(policies)}: '
                    f'{attempts[-1].get("error", "")}')


def release_torch() -> None:
  """Frees what a dropped timm step held, torch's cached blocks included."""
  gc.collect()
  torch = sys.modules.get('torch')
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------
# The steps: ours (one per row), timm's (one per model, shared by its rows).
# --------------------------------------------------------------------------------
def our_builder(config: ml_collections.ConfigDict, fields: Any, batch: int,
                shape: tuple[int, int, int], num_classes: int
                ) -> Callable[[str], Step]:
  """build(remat): our train step for `fields` compiled with that policy;
  facts gain attention_kernel ('cudnn' where XLA kept cuDNN's attention)."""
  def build(remat: str) -> Step:
    variant = copy.deepcopy(fields)
    variant.remat_policy = remat
    held = bytes_in_use()  # The build allocates the state: counted below.
    run, facts = benchmark.build_jax_step(config, variant, 'train', batch,
                                          shape, num_classes)
    compiled = facts.pop('compiled')
    need = program_bytes(compiled)
    facts['attention_kernel'] = (
        'cudnn' if CUDNN_ATTENTION in (compiled.as_text() or '') else 'xla')
    return Step(run, facts, None if need is None else held + need)
  return build


class TimmPeer:
  """timm's train step for one model, built when first asked for (after our
  step, which gets the memory first) and shared by the model's rows. When it
  cannot be built (out of memory even with checkpointing, or any other
  error: our row is still timed alone), `note` says why and the next call
  tries again."""

  def __init__(self, config: ml_collections.ConfigDict, fields: Any,
               batch: int, shape: tuple[int, int, int], num_classes: int,
               precision_name: str, device: str):
    self.step: Step | None = None
    self.note: str | None = None
    self._device = device
    self._build = lambda remat: Step(*bench_timm.build_timm_step(
        fields, 'train', batch, shape, num_classes, config, precision_name,
        device=device, grad_checkpointing=remat == 'full'))

  def get(self) -> Step | None:
    if self.step is None:
      try:
        self.step, remat, _ = first_that_fits(self._build, TIMM_REMAT, None,
                                              release=release_torch)
      except Exception as e:  # pylint: disable=broad-except
        if not isinstance(e, MemoryError):
          traceback.print_exc()
        self.note = f'timm: {type(e).__name__}: {e}'.splitlines()[0][:300]
      if self.step is None:
        release_torch()  # Outside the handler, as in first_that_fits.
        return None
      from timm import layers  # pylint: disable=g-import-not-at-top
      self.step.facts.update(
          timm_remat=remat, timm_device=self._device,
          timm_attention='sdpa' if layers.use_fused_attn() else 'explicit')
      self.note = None
    return self.step

  def close(self) -> None:
    self.step = None
    release_torch()
