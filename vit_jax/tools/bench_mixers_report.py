"""The token-mixer sweep's report: crossing table, text tables and plot.

Split from vit_jax/tools/bench_mixers.py (which runs the points): these read
the sweep's result dict only, and run no JAX.
"""

from typing import Any

# The sweep's mixers in report order; the others are compared with REFERENCE.
MIXERS = ('softmax', 'favor', 'afno', 'global_filter')
MODES = ('train', 'infer')
KINDS = ('block', 'model')
REFERENCE = 'softmax'


def crossings(points: list[dict[str, Any]], kind: str) -> dict[str, Any]:
  """{mixer: {mode: {faster_from, faster_at, compared, text}}}: token counts
  (of `kind` points) at which the mixer beats softmax attention in img/s."""
  table: dict[str, Any] = {}
  speed = lambda mixer, mode: {p['tokens']: p['img_per_sec'] for p in points
                               if p['ok'] and p['kind'] == kind
                               and p['mixer'] == mixer and p['mode'] == mode}
  measured = {p['mixer'] for p in points if p['kind'] == kind}
  for mixer in [m for m in MIXERS if m in measured and REFERENCE in measured
                and m != REFERENCE]:
    for mode in MODES:
      ref, own = speed(REFERENCE, mode), speed(mixer, mode)
      both = sorted(set(ref) & set(own))
      faster = [t for t in both if own[t] > ref[t]]
      if not both:
        text = 'not measured'
      elif not faster:
        text = f'none up to {both[-1]}'
      else:
        slower = [t for t in both if t > faster[0] and t not in faster]
        text = str(faster[0]) + (f' (slower at {slower})' if slower else '')
      table.setdefault(mixer, {})[mode] = dict(
          faster_from=faster[0] if faster else None, faster_at=faster,
          compared=both, text=text)
  return table


def format_number(value: float) -> str:
  """3 significant digits, or a whole number from 100 up."""
  return f'{value:.0f}' if value >= 100 else f'{value:.3g}'


def _speed_table(points: list[dict[str, Any]], kind: str) -> list[str]:
  """Rows (mode, mixer), a column per token count: 'img/s peak-MB' cells."""
  mine = [p for p in points if p['kind'] == kind]
  tokens = sorted({p['tokens'] for p in mine})
  label = {p['tokens']: (f"{p['image_size']}px/{p['tokens']}" if kind == 'model'
                         else str(p['tokens'])) for p in mine}
  lines = [f"{'':21}" + ''.join(f'{label[t]:>17}' for t in tokens)]
  for mode in MODES:
    for mixer in MIXERS:
      row = {p['tokens']: (f"{format_number(p['img_per_sec'])}/s {p['peak_mb']:.0f}MB"
                           if p['ok'] else 'FAILED') for p in mine
             if (p['mode'], p['mixer']) == (mode, mixer)}
      if row:
        lines.append(f'{mode:6}{mixer:15}' + ''.join(
            f"{row.get(t, '-'):>17}" for t in tokens))
  return lines


def format_report(result: dict[str, Any]) -> str:
  """The sweep's tables; the JSON holds everything."""
  hidden, mlp, heads = result['block_shape']
  lines = [f"token mixers on {result['cpu']} ({result['backend']}, "
           f"{result['precision']}): img/s and peak memory by token count"]
  titles = {'block': f'one block (hidden {hidden}, MLP {mlp}, {heads} heads), '
                     f"batch {result['block_batch']}",
            'model': f"full models, batch {result['model_batch']}"}
  for kind in KINDS:
    if any(p['kind'] == kind for p in result['points']):
      lines += ['', titles[kind]] + _speed_table(result['points'], kind)
    if result['crossings'].get(kind):
      lines += ['', f'{kind}: smallest token count faster than {REFERENCE}',
                f"{'':15}{'train':>24}{'infer':>24}"]
      lines += [f'{mixer:15}' + ''.join(f"{modes[m]['text']:>24}" for m in MODES)
                for mixer, modes in result['crossings'][kind].items()]
  lines += [f"FAILED {p['kind']} {p['mixer']} {p['mode']} {p['tokens']} "
            f"tokens: {p['error']}" for p in result['points'] if not p['ok']]
  return '\n'.join(lines)


def write_plot(result: dict[str, Any], path: str) -> None:
  """img/s and peak memory vs tokens (log-log), train and infer, as a PNG."""
  # Imported here: matplotlib is slow to import and only the plot needs it.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(12, 8), layout='constrained')
  axes = fig.subplots(2, 2)
  colors = dict(zip(MIXERS, ('tab:blue', 'tab:orange', 'tab:green', 'tab:red')))
  ok = [p for p in result['points'] if p['ok']]
  tokens = sorted({p['tokens'] for p in ok})
  memory = ', '.join(sorted({p['memory'] for p in ok}))
  for col, mode in enumerate(MODES):
    for row, (field, ylabel) in enumerate((('img_per_sec', 'img/s'),
                                           ('peak_mb', f'peak MB ({memory})'))):
      ax = axes[row, col]
      for mixer in MIXERS:
        for kind, style in zip(KINDS, ('o-', 's--')):
          xy = sorted((p['tokens'], p[field]) for p in ok
                      if (p['kind'], p['mixer'], p['mode']) == (kind, mixer, mode))
          if xy:
            ax.plot(*zip(*xy), style, color=colors[mixer], label=f'{mixer} {kind}')
      ax.set(xscale='log', yscale='log', xlabel='tokens', ylabel=ylabel,
             title=f'{mode}: {ylabel}')
      ax.set_xticks(tokens, [str(t) for t in tokens])
      ax.set_xticks([], minor=True)
  lines = {line.get_label(): line for ax in axes.flat for line in ax.lines}
  order = [f'{m} {k}' for m in MIXERS for k in KINDS if f'{m} {k}' in lines]
  fig.legend([lines[label] for label in order], order, loc='outside right upper')
  fig.suptitle(f"Token mixers (o- one block, batch {result['block_batch']}; "
               f"s-- full model, batch {result['model_batch']}) on "
               f"{result['cpu']}, backend {result['backend']}")
  fig.savefig(path, dpi=100)
