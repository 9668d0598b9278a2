"""The papers' ablation at small scale, on the built-in demo: random init, InfoNCE, local InfoNCE,
CoCLR and CVTCL, RGB and flow, each trained through the project's real command lines and
measured the same way. Writes a Markdown table and a PNG plot (R@1 against epoch, one line per
method, RGB and flow side by side) to docs/ (``--results``).

    python bench/learning.py --profile cpu     # the demo configs (small3d): <= 45 min on 2 cores
    python bench/learning.py --profile gpu     # S3D on 32 frames, 100 + 50 epochs, on a GPU

Methods (docs/METHOD.md, Losses and CVTCL): InfoNCE = ``local_nce.py --w_inter 0 --w_intra 0``;
local InfoNCE = ``local_nce.py``; CoCLR = ``local_coclr.py --w_inter 0 --w_intra 0`` started from
the two InfoNCE checkpoints; CVTCL = ``local_coclr.py`` started from the two local-InfoNCE
checkpoints. The co-training order is the papers': the RGB network mines with the flow network,
then the flow network with that RGB network. Every method runs with the same settings; nothing
is tuned per method.

Measured for each: the curve is the run's own retrieval monitor (``--monitor_freq 1``: R@1 at
the start and after every epoch, read from its log.jsonl; co-training curves continue from the
epoch their starting checkpoints ended at); at the end, nearest-neighbour retrieval R@1/R@5 of the
last checkpoint over all windows (``eval/main_classifier.py --retrieval --protocol clean``, test
videos query the train videos) and the scikit-learn feature probe top-1
(``eval/feature_linear_probe.py``). matplotlib is needed for the plot (requirements-dev.txt).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {
    'cpu': dict(epochs=40, coclr_epochs=20, flags=['--local_aug', 'shared'], net='small3d'),
    'gpu': dict(epochs=100, coclr_epochs=50, net='s3d',
                flags=['--net', 's3d', '--seq_len', '32', '--batch_size', '32', '-j', '8',
                       '--local_aug', 'shared']),
}
# (method, modality) -> script, config, extra flags, the (method, modality) of its --pretrain
STAGES = [
    (('InfoNCE', 'rgb'), 'local_nce.py', 'demo_rgb', ['--w_inter', '0', '--w_intra', '0'], []),
    (('InfoNCE', 'flow'), 'local_nce.py', 'demo_flow', ['--w_inter', '0', '--w_intra', '0'], []),
    (('local InfoNCE', 'rgb'), 'local_nce.py', 'demo_rgb', [], []),
    (('local InfoNCE', 'flow'), 'local_nce.py', 'demo_flow', [], []),
    (('CoCLR', 'rgb'), 'local_coclr.py', 'demo_coclr_rgb', ['--w_inter', '0', '--w_intra', '0'],
     [('InfoNCE', 'rgb'), ('InfoNCE', 'flow')]),
    (('CoCLR', 'flow'), 'local_coclr.py', 'demo_coclr_flow', ['--w_inter', '0', '--w_intra', '0'],
     [('InfoNCE', 'flow'), ('CoCLR', 'rgb')]),
    (('CVTCL', 'rgb'), 'local_coclr.py', 'demo_coclr_rgb', [],
     [('local InfoNCE', 'rgb'), ('local InfoNCE', 'flow')]),
    (('CVTCL', 'flow'), 'local_coclr.py', 'demo_coclr_flow', [],
     [('local InfoNCE', 'flow'), ('CVTCL', 'rgb')]),
]


def run(cmd, log):
    """One command line of the project, from the project root; its stdout."""
    line = ' '.join(map(str, cmd)).replace(f'{ROOT}/', '')
    print(f'$ python {line}', flush=True)
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    log.write(f'$ python {line}\n{proc.stdout}\n{proc.stderr}\n')
    if proc.returncode:
        sys.exit(f'command failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}')
    return proc.stdout


def measure(weights, modality, out, args, log):
    """Retrieval R@1, R@5 and the feature probe's top-1 of ``weights`` (a checkpoint or
    'random'), results and feature caches under ``out``."""
    flags = ['--net', PROFILES[args.profile]['net'], '--seq_len', 16, '--ds', 1, '--img_dim', 64,
             '--batch_size', 8, '--dataset', 'demo' if modality == 'rgb' else 'demo-f',
             '--test', weights, '--protocol', 'clean', '--output_dir', out,
             '--max_videos', args.max_videos, *args.common]
    text = run(['eval/main_classifier.py', *flags, '--retrieval'], log)
    recall = dict(w.split('=') for w in text.strip().splitlines()[-1].split(': ')[1].split())
    result = {'R@1': float(recall['R@1']), 'R@5': float(recall['R@5'])}
    last = run(['eval/feature_linear_probe.py', *flags], log).strip().splitlines()[-1]
    result['probe'] = float(last.split('top1=')[1].split()[0])
    return result


def monitor_curve(exp, offset):
    """(epochs trained, R@1) of every monitor measurement in a run's log.jsonl."""
    records = [json.loads(line) for line in (exp / 'log.jsonl').read_text().splitlines()]
    return [(offset + r['epoch'] + 1, r['R@1']) for r in records if 'R@1' in r]


def plot(curves, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    methods = list(dict.fromkeys(method for method, _ in curves))   # one colour each, both panels
    for ax, modality in zip(axes, ('rgb', 'flow')):
        for (method, m), points in curves.items():
            if m == modality:
                ax.plot(*zip(*points), marker='o', label=method,
                        color=f'C{methods.index(method)}')
        ax.set(title=f'{modality.upper()}: test videos query train videos (monitor)',
               xlabel='epochs trained (0: random init)', ylabel='retrieval R@1 (%)')
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--profile', choices=sorted(PROFILES), default='cpu', help='stage lengths')
    p.add_argument('--output_dir', default=str(ROOT / 'experiments' / 'learning'),
                   help='every run goes here (must not exist yet)')
    p.add_argument('--results', default=str(ROOT / 'docs' / 'LEARNING.md'),
                   help='the Markdown table; the plot is written beside it (.png)')
    p.add_argument('--data_root', default=None, help='default: the project data root')
    p.add_argument('--epochs', type=int, default=None, help="InfoNCE stages (default: profile's)")
    p.add_argument('--coclr_epochs', type=int, default=None, help="co-training stages")
    p.add_argument('--iters_per_epoch', type=int, default=0, help='0: whole epochs (a reduced '
                   'run for a quick check only)')
    p.add_argument('--max_videos', type=int, default=0, help="evaluation's --max_videos (0: all)")
    args = p.parse_args()
    prof = PROFILES[args.profile]
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True)   # refuses an existing folder: its runs would be mixed in
    log, start = open(out / 'commands.log', 'w'), time.time()
    args.common = ['--data_root', args.data_root] if args.data_root else []
    epochs = {'local_nce.py': args.epochs or prof['epochs'],
              'local_coclr.py': args.coclr_epochs or prof['coclr_epochs']}
    random = {m: measure('random', m, out / 'random', args, log) for m in ('rgb', 'flow')}
    last, ended, curves, final = {}, {}, {}, {}
    for key, script, config, extra, pretrain in STAGES:
        folder = out / '_'.join(key).replace(' ', '_')
        run([script, '--config', f'configs/{config}.toml', *extra, *prof['flags'], *args.common,
             '--epochs', epochs[script], '--iters_per_epoch', args.iters_per_epoch,
             '--monitor_freq', 1, '--output_dir', folder]
            + (['--pretrain', *(last[k] for k in pretrain)] if pretrain else []), log)
        (exp,) = [d for d in folder.iterdir() if d.is_dir()]
        offset = ended[pretrain[0]] if pretrain else 0
        last[key], ended[key] = exp / 'last.pth.tar', offset + epochs[script]
        curves[key] = monitor_curve(exp, offset)
        final[key] = measure(last[key], key[1], folder / 'eval', args, log)
        print(f'{key}: monitor R@1 by epoch ' + ' '.join(f'{y:.1f}' for _, y in curves[key])
              + f'; at the end, all windows: {final[key]}', flush=True)

    results = Path(args.results)
    plot(curves, results.with_suffix('.png'))
    rows = ["# The papers' ablation at small scale (bench/learning.py)", '',
            'Written by the command below; what it shows and does not: docs/RESULTS.md.', '',
            f'`python bench/learning.py --profile {args.profile}` on '
            f'{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs (load average '
            f'{os.getloadavg()[0]:.1f} at the end), {(time.time() - start) / 60:.1f} minutes; '
            f'epochs {epochs["local_nce.py"]} (InfoNCE stages) and {epochs["local_coclr.py"]} '
            f'(co-training), iterations per epoch {args.iters_per_epoch or "all"}, evaluation '
            f'videos per split {args.max_videos or "all"}.', '',
            f'![R@1 against epoch]({results.with_suffix(".png").name})', '',
            'Monitor: the run\'s own R@1 (middle window of each video) at its start, its end '
            'and its best (epochs trained). End: the last checkpoint over all windows, and the '
            'feature probe.', '',
            '| method | modality | monitor start | monitor end | monitor best (epoch) | '
            'end R@1 | end R@5 | probe top-1 |',
            '|---|---|---|---|---|---|---|---|']
    for m in ('rgb', 'flow'):
        r = random[m]
        rows.append(f'| random init | {m} | | | | {r["R@1"]:.1f} | {r["R@5"]:.1f} | '
                    f'{r["probe"]:.1f} |')
        for (method, modality), points in curves.items():
            if modality == m:
                f = final[method, m]
                best = max(points, key=lambda xy: xy[1])
                rows.append(f'| {method} | {m} | {points[0][1]:.1f} | {points[-1][1]:.1f} | '
                            f'{best[1]:.1f} ({best[0]}) | {f["R@1"]:.1f} | {f["R@5"]:.1f} | '
                            f'{f["probe"]:.1f} |')
    results.write_text('\n'.join(rows) + '\n')
    (out / 'curves.json').write_text(json.dumps(
        {f'{k[0]} {k[1]}': v for k, v in curves.items()}, indent=1))
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
