"""Each matrix product of a compiled step: its rate inside the step against the
same product compiled alone (`vit_jax.tools.benchmark --profile_dots`).

A step's MFU says how far it is from the machine's peak, not where the time
goes. This profiles the step (jax.profiler: one event per executed HLO op, its
name the op's), finds every dot in the optimized HLO (top-level, or inside the
fusion that runs it), and times each distinct dot again on its own: a jitted
`lax.dot_general` of the same shapes, dtypes, contraction and operand layouts.
A dot slower inside the step than alone loses to its neighbours (a layout XLA
chose for them, a cache the glue evicted); one slow alone is the kernel's rate.
What is not a dot is the glue, summed by the op's kind.

Products repeated per layer share one row (`count` per step). Rates are
GFLOP/s of the dot's 2*m*n*k; an in-step fusion's time includes whatever else
it fused with the dot (a convert, a bias), which the standalone one lacks.
XLA CPU runs independent ops at the same time (and Eigen's dots after their
thunk returns): where ops overlap, each gets an equal share of that time, so
the rows and the glue add up to the step's busy time, and an op's in-step rate
is what it made of its share of the cores.
"""

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# Ops that only sequence others: their events span their children's.
_CONTROL_OPS = ('while', 'call', 'conditional', 'async-start', 'async-done')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>\([^=]*\)|[\w]+\[[\d,]*\]'
    r'(?:\{[^}]*\})?) (?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<attrs>.*)$')
_ARRAY = re.compile(r'^(?P<dtype>\w+)\[(?P<dims>[\d,]*)\](?:\{(?P<layout>[\d,]*))?')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(?P<name>[\w.\-]+) ')
# HLO's element type names -> numpy's (the dots XLA emits for our models).
_DTYPES = {'f32': 'float32', 'bf16': 'bfloat16', 'f16': 'float16',
           'f64': 'float64', 's8': 'int8', 's32': 'int32', 'u8': 'uint8'}


@dataclasses.dataclass(frozen=True)
class Operand:
  """An array's logical shape, dtype and minor-to-major layout."""
  dtype: str
  shape: tuple[int, ...]
  layout: tuple[int, ...]

  def text(self) -> str:
    default = tuple(range(len(self.shape) - 1, -1, -1))
    mark = '' if self.layout in (default, ()) else '{' + ','.join(
        map(str, self.layout)) + '}'
    return f"{self.dtype}[{','.join(map(str, self.shape))}]{mark}"


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot instruction: what it multiplies and where the model asked for it."""
  lhs: Operand
  rhs: Operand
  out_dtype: str
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  label: str  # The jax op name of the model's call, layer indices folded.

  @property
  def flops(self) -> int:
    # The lhs holds the batch, its free and the contracted axes; the rhs adds
    # its free ones.
    free_rhs = math.prod(s for d, s in enumerate(self.rhs.shape)
                         if d not in self.rhs_contract + self.rhs_batch)
    return 2 * math.prod(self.lhs.shape) * free_rhs

  def text(self) -> str:
    return (f'{self.lhs.text()} x {self.rhs.text()} '
            f'c{list(self.lhs_contract)}{list(self.rhs_contract)}'
            + (f' b{list(self.lhs_batch)}' if self.lhs_batch else '')
            + f' -> {self.out_dtype}')


def _operand(type_text: str) -> Operand | None:
  m = _ARRAY.match(type_text)
  if m is None:
    return None
  dims = tuple(int(d) for d in m['dims'].split(',') if d)
  layout = tuple(int(d) for d in (m['layout'] or '').split(',') if d)
  return Operand(m['dtype'], dims, layout)


def _dims(attrs: str, key: str) -> tuple[int, ...]:
  m = re.search(key + r'=\{([\d,]*)\}', attrs)
  return tuple(int(d) for d in m.group(1).split(',') if d) if m else ()


def _label(attrs: str) -> str:
  """'fwd' or 'bwd' and the module path of the jax op name, layers folded:
  'bwd Transformer/encoderblock_*/MlpBlock_3/Dense_0'."""
  m = re.search(r'op_name="([^"]*)"', attrs)
  if m is None:
    return '?'
  name = re.sub(r'^jit\([^)]*\)/', '', m.group(1))
  direction = 'bwd' if 'transpose(' in name else 'fwd'
  name = re.sub(r'^(?:\w+\()+[\w.]*\)*/?', '', name)  # transpose(jvp(Model))/
  name = re.sub(r'(encoderblock|layer|block)_\d+', r'\1_*', name)
  return f"{direction} {name.removesuffix('/dot_general') or '(top)'}"


def _computations(text: str) -> dict[str, list[re.Match]]:
  """{computation name: its instructions} of an HLO module's text."""
  computations: dict[str, list[re.Match]] = {}
  current = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith('{'):
      current = computations.setdefault(header['name'], [])
    elif current is not None and (m := _INSTRUCTION.match(line)):
      current.append(m)
  return computations


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, Dot]]:
  """(op kind of every instruction, the Dot each dot-running op runs).

  Keys are instruction names, the names a profile's events carry: a dot maps
  to itself, a fusion to the dot of the computation it calls.
  """
  computations = _computations(text)
  kinds, dots, fused_dot = {}, {}, {}
  for computation, instructions in computations.items():
    types = {m['name']: m['type'] for m in instructions}
    for m in instructions:
      kinds[m['name']] = m['op']
      if m['op'] != 'dot':
        continue
      lhs, rhs = (_operand(types.get(a.strip().lstrip('%'), ''))
                  for a in m['args'].split(',')[:2])
      if lhs is None or rhs is None:
        continue
      dots[m['name']] = Dot(
          lhs, rhs, _ARRAY.match(m['type'])['dtype'],
          _dims(m['attrs'], 'lhs_contracting_dims'),
          _dims(m['attrs'], 'rhs_contracting_dims'),
          _dims(m['attrs'], 'lhs_batch_dims'),
          _dims(m['attrs'], 'rhs_batch_dims'), _label(m['attrs']))
      fused_dot.setdefault(computation, dots[m['name']])
  for instructions in computations.values():
    for m in instructions:
      called = re.search(r'calls=%([\w.\-]+)', m['attrs'])
      if m['op'] == 'fusion' and called and called.group(1) in fused_dot:
        dots[m['name']] = fused_dot[called.group(1)]
  return kinds, dots


def profile_ms(run: Callable[[int], int], module: str, steps: int = 2,
               skip: frozenset[str] = frozenset()) -> dict[str, float]:
  """{HLO op name: ms per step and device} of `steps` runs of `run` under
  jax.profiler: the ops of the executable called `module` (its HLO module's
  name), averaged over the devices that ran it.

  An op runs from its event's start to the end of its `end: NAME` event where
  it has one: XLA CPU finishes some thunks (Eigen's dots) after their event
  has returned, and marks their completion so. Ops overlap (XLA runs
  independent ones at the same time): each stretch of time is shared equally
  among the ops running in it, so an op's time is its share of the cores' busy
  time and the ops' times add up to the step's busy time. Ops in `skip` (a
  loop or call, whose events span their body's) are left out.
  """
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      done = run(steps)
    paths = glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'),
                      recursive=True)
    if not paths:
      raise RuntimeError(f'jax.profiler wrote no trace under {logdir}')
    with gzip.open(paths[0], 'rt', encoding='utf-8') as f:
      events = [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X']
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)
  own_ends, devices = collections.defaultdict(list), set()
  for event in events:
    args = event.get('args') or {}
    if args.get('hlo_module') == module:
      op = args.get('hlo_op', event['name'])
      if op in skip:
        continue
      starts[op].append(event['ts'])
      own_ends[op].append(event['ts'] + event['dur'])
      devices.add(args.get('device_ordinal'))
    elif event['name'].startswith('end: '):
      ends[event['name'][5:]].append(event['ts'] + event['dur'])
  if not starts:
    raise RuntimeError(f'the profile holds no events of module {module!r}')
  intervals = []
  for op, op_starts in starts.items():
    op_ends = ends.get(op, [])
    if len(op_ends) != len(op_starts):  # No (or not one per run) end events.
      op_ends = own_ends[op]
    # The k-th run of an op on a device ends before its (k+1)-th starts.
    intervals += [(a, max(a, b), op) for a, b in zip(sorted(op_starts),
                                                     sorted(op_ends))]
  shared = _share_time(intervals)
  return {op: us / 1e3 / done / len(devices) for op, us in shared.items()}


def _share_time(intervals: list[tuple[float, float, str]]) -> dict[str, float]:
  """{name: time}, each stretch of time split equally among the intervals
  covering it (a sweep over the intervals' ends)."""
  points = sorted([(a, 1, i) for i, (a, _, _) in enumerate(intervals)] +
                  [(b, -1, i) for i, (_, b, _) in enumerate(intervals)],
                  key=lambda p: (p[0], -p[1]))  # Starts first.
  shared = collections.defaultdict(float)
  active: set[int] = set()
  last = None
  for time_, change, index in points:
    if active and last is not None and time_ > last:
      for i in active:
        shared[intervals[i][2]] += (time_ - last) / len(active)
    last = time_
    if change > 0:
      active.add(index)
    else:
      active.discard(index)
  for _, _, name in intervals:  # Zero-length runs keep their row.
    shared.setdefault(name, 0.0)
  return dict(shared)


def module_name(hlo_text: str) -> str:
  """The name in the text's `HloModule NAME, ...` line (profile events'
  `hlo_module`)."""
  m = re.match(r'HloModule ([\w.\-]+)', hlo_text)
  if m is None:
    raise ValueError('not an HLO module text: no leading "HloModule NAME"')
  return m.group(1)


def _numpy_dtype(hlo_dtype: str) -> jnp.dtype:
  if hlo_dtype not in _DTYPES:
    raise ValueError(f'a dot of HLO element type {hlo_dtype!r}: not one of '
                     f'{sorted(_DTYPES)}')
  return jnp.dtype(_DTYPES[hlo_dtype])


def _physical(operand: Operand, rng: np.random.Generator
              ) -> tuple[np.ndarray, tuple[int, ...]]:
  """A random array stored in `operand`'s layout and the transpose that makes
  it the logical operand (inside jit, where XLA folds it into the dot)."""
  rank = len(operand.shape)
  order = tuple(reversed(operand.layout)) if operand.layout else tuple(range(rank))
  data = rng.uniform(-1, 1, [operand.shape[d] for d in order])
  return data.astype(_numpy_dtype(operand.dtype)), tuple(order.index(d)
                                                      for d in range(rank))


def time_alone(dot: Dot, min_seconds: float = 0.05, repeats: int = 5) -> float:
  """Seconds of `dot` compiled on its own: best of `repeats` timed runs, each
  of as many calls as fill `min_seconds`."""
  rng = np.random.default_rng(0)
  (lhs, lhs_perm), (rhs, rhs_perm) = _physical(dot.lhs, rng), _physical(dot.rhs, rng)
  dims = ((dot.lhs_contract, dot.rhs_contract), (dot.lhs_batch, dot.rhs_batch))
  out = _numpy_dtype(dot.out_dtype)
  product = jax.jit(lambda a, b: jax.lax.dot_general(
      jnp.transpose(a, lhs_perm), jnp.transpose(b, rhs_perm), dims,
      preferred_element_type=out))
  lhs, rhs = jax.device_put(lhs), jax.device_put(rhs)

  def seconds(calls: int) -> float:  # Of `calls` calls back to back.
    start = time.perf_counter()
    for _ in range(calls):
      result = product(lhs, rhs)
    result.block_until_ready()
    return time.perf_counter() - start

  seconds(1)  # Compile and warm up.
  calls = 1
  while seconds(calls) < min_seconds and calls < 1 << 12:
    calls *= 2
  return min(seconds(calls) for _ in range(repeats)) / calls


def _kind(op_name: str, kinds: dict[str, str]) -> str:
  """A glue op's kind: fusions by their name without the number
  ('transpose_copy_fusion'), other ops by their opcode."""
  kind = kinds.get(op_name, '?')
  if kind == 'fusion':
    return re.sub(r'\.\d+$', '', op_name)
  return kind


def report(compiled: Any, run: Callable[[int], int], step_ms: float,
           steps: int = 2, glue_rows: int = 8) -> dict[str, Any]:
  """The step's dots, grouped, against themselves alone, and its glue.

  Returns {'dots': rows (label, dot, count, flops, in_step_ms, alone_ms,
  in_step_gflops, alone_gflops, in_over_alone), 'glue': [(kind, ms)],
  'busy_ms' (the ops' times together), 'dots_ms', 'step_ms'}: times per
  step, of one device (on several, the products are each device's shard).
  """
  text = compiled.as_text()
  kinds, dots = parse_hlo(text)
  ms = profile_ms(run, module_name(text), steps, skip=frozenset(
      op for op, kind in kinds.items() if kind in _CONTROL_OPS))
  groups: dict[Dot, list[float]] = collections.defaultdict(list)
  glue = collections.Counter()
  for op, op_ms in ms.items():
    if op in dots:
      groups[dots[op]].append(op_ms)
    else:
      glue[_kind(op, kinds)] += op_ms
  rows = []
  for dot, times in groups.items():
    alone_ms = 1e3 * time_alone(dot)
    in_step = sum(times)
    rows.append({
        'label': dot.label, 'dot': dot.text(), 'count': len(times),
        'flops': dot.flops, 'in_step_ms': in_step, 'alone_ms': alone_ms,
        'in_step_gflops': (len(times) * dot.flops / in_step / 1e6
                           if in_step else None),
        'alone_gflops': dot.flops / alone_ms / 1e6,
        'in_over_alone': len(times) * alone_ms / in_step if in_step else None})
  rows.sort(key=lambda r: -r['in_step_ms'])
  dots_ms = sum(r['in_step_ms'] for r in rows)
  return {'dots': rows, 'glue': glue.most_common(glue_rows),
          'busy_ms': dots_ms + sum(glue.values()), 'dots_ms': dots_ms,
          'step_ms': step_ms}


def format_lines(result: dict[str, Any]) -> list[str]:
  """The table of `report`'s result, if the step was profiled."""
  r = result.get('profile_dots')
  if not r:
    return []
  lines = [f"  dots: {r['dots_ms']:.1f} of {r['busy_ms']:.1f} busy ms per step "
           f"under the profiler (timed step {r['step_ms']:.1f} ms); GFLOP/s in "
           'the step vs alone:',
           f"    {'in ms':>8} {'n':>3} {'in':>6} {'alone':>6} {'ratio':>5}  "
           'product  (where)']
  for row in r['dots']:
    lines.append(
        f"    {row['in_step_ms']:8.1f} {row['count']:3d} "
        f"{row['in_step_gflops'] or 0:6.0f} {row['alone_gflops']:6.0f} "
        f"{row['in_over_alone'] or 0:5.2f}  {row['dot']}  ({row['label']})")
  lines.append('  glue (ms per step): ' + ', '.join(
      f'{kind} {ms:.1f}' for kind, ms in r['glue']))
  return lines
