"""The whole method on the built-in demo dataset, end to end, through the real command lines:

local InfoNCE (RGB, flow) -> one CVTCL cycle (RGB with flow mining, flow with RGB mining) ->
retrieval R@k for random init / InfoNCE / CVTCL on RGB and flow -> a short finetune of the CVTCL
networks with a ten-crop test -> two-stream fusion. Prints one results table and writes it to
docs/RESULTS.md (or --results) with the commands, the machine and the date.

    python scripts/demo_pipeline.py                  # CPU profile: ~15 min on 2 cores
    python scripts/demo_pipeline.py --profile gpu    # full length: ~200 epochs per stage

On the CPU the pretraining stages are far too short for learning to show; the numbers say
whatever they honestly are.
"""
import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.config import POSITIVE

ROOT = Path(__file__).resolve().parents[1]

PROFILES = {
    # pretraining: epochs and iterations per epoch (0 = whole epoch), checkpoint every N epochs;
    # CVTCL queue length; finetuning epochs and iterations, test every N epochs.
    'cpu': dict(pre_epochs=1, pre_iters=15, save_freq=1, coclr_k=64, ft_epochs=1, ft_iters=15,
                eval_freq=1, workers=2, batch=8),
    'gpu': dict(pre_epochs=200, pre_iters=0, save_freq=50, coclr_k=128, ft_epochs=30, ft_iters=0,
                eval_freq=5, workers=12, batch=32),
}


def shown(cmd):
    """A command as a user would type it: ``python``, paths relative to the project."""
    words = ['python' if str(c) == sys.executable else str(c) for c in cmd]
    return ' '.join(w.replace(str(ROOT) + '/', '') for w in words)


def run(cmd, log):
    """Run one command line of the project; echo it, keep its output, fail loudly."""
    line = shown(cmd)
    print(f'\n$ {line}', flush=True)
    t = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
    log.write(f'$ {line}\n{proc.stdout}\n{proc.stderr}\n')
    if proc.returncode:
        sys.exit(f'command failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}')
    print(f'  ({time.time() - t:.0f} s)', flush=True)
    return proc.stdout, line


def only_dir(parent):
    dirs = sorted(d for d in Path(parent).iterdir() if d.is_dir())
    if len(dirs) != 1:
        sys.exit(f'expected one experiment folder in {parent}, found {dirs}')
    return dirs[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--profile', choices=sorted(PROFILES), default='cpu',
                   help='stage lengths and sizes: cpu (a short check) or gpu (full length)')
    p.add_argument('--output_dir', default=str(ROOT / 'experiments' / 'demo_pipeline'),
                   help='all runs of the pipeline go here (must not exist yet)')
    p.add_argument('--data_root', default=None, help='default: the project data root')
    p.add_argument('--results', default=str(ROOT / 'docs' / 'RESULTS.md'),
                   help='markdown file the results table is written to')
    p.add_argument('--device', default='auto', help="every stage's --device")
    p.add_argument('--decode', choices=['cpu', 'gpu'], default='cpu',
                   help="pretraining's --decode (where JPEG frames are decoded)")
    p.add_argument('--pre_epochs', type=POSITIVE, default=None,
                   help="epochs of each pretraining stage (default: the profile's)")
    args = p.parse_args()
    prof = dict(PROFILES[args.profile])
    if args.pre_epochs is not None:
        prof['pre_epochs'] = args.pre_epochs
    out = Path(args.output_dir).resolve()
    if out.exists():
        sys.exit(f'error: --output_dir {out} exists; remove it or choose another')
    out.mkdir(parents=True)
    log = open(out / 'pipeline.log', 'w')
    py = sys.executable
    common = ['--device', args.device, '-j', prof['workers']]
    if args.data_root:
        common += ['--data_root', args.data_root]
    pre = ['--epochs', prof['pre_epochs'], '--iters_per_epoch', prof['pre_iters'],
           '--save_freq', prof['save_freq'], '--batch_size', prof['batch'],
           '--decode', args.decode, *common]
    commands, t0 = [], time.time()

    def stage(cmd, folder):
        stdout, line = run(cmd + ['--output_dir', out / folder], log)
        commands.append(line)
        return stdout

    # 1. local InfoNCE, RGB and flow
    ckpt = {}
    for modality, config in (('rgb', 'demo_rgb'), ('flow', 'demo_flow')):
        stage([py, 'local_nce.py', '--config', f'configs/{config}.toml', *pre], f'infonce_{modality}')
        ckpt[f'infonce_{modality}'] = only_dir(out / f'infonce_{modality}') / 'last.pth.tar'
    # 2. one CVTCL cycle
    stage([py, 'local_coclr.py', '--config', 'configs/demo_coclr_rgb.toml', *pre,
           '--moco-k', prof['coclr_k'],
           '--pretrain', ckpt['infonce_rgb'], ckpt['infonce_flow']], 'cvtcl_rgb')
    ckpt['cvtcl_rgb'] = only_dir(out / 'cvtcl_rgb') / 'last.pth.tar'
    stage([py, 'local_coclr.py', '--config', 'configs/demo_coclr_flow.toml', *pre,
           '--moco-k', prof['coclr_k'],
           '--pretrain', ckpt['infonce_flow'], ckpt['cvtcl_rgb']], 'cvtcl_flow')
    ckpt['cvtcl_flow'] = only_dir(out / 'cvtcl_flow') / 'last.pth.tar'

    # 3. retrieval: random init, InfoNCE, CVTCL; RGB and flow
    evalc = [py, 'eval/main_classifier.py', '--config', 'configs/demo_finetune.toml',
             '--batch_size', prof['batch'], *common]
    recall = {}
    for modality, dataset in (('rgb', 'demo'), ('flow', 'demo-f')):
        for method in ('random', 'infonce', 'cvtcl'):
            weights = 'random' if method == 'random' else ckpt[f'{method}_{modality}']
            stdout = stage(evalc + ['--dataset', dataset, '--test', weights, '--retrieval'],
                           f'retrieval_{method}_{modality}')
            m = re.search(r'^retrieval \S+ split\d+: (.*)$', stdout, re.M)
            recall[method, modality] = dict(re.findall(r'(R@\d+)=([\d.]+)', m.group(1)))

    # 4. short finetune of the CVTCL networks, ten-crop test, two-stream fusion
    tests = {}
    for modality, dataset in (('rgb', 'demo'), ('flow', 'demo-f')):
        stage(evalc + ['--dataset', dataset, '--pretrain', ckpt[f'cvtcl_{modality}'],
                       '--epochs', prof['ft_epochs'], '--iters_per_epoch', prof['ft_iters'],
                       '--eval_freq', prof['eval_freq'], '--schedule'], f'finetune_{modality}')
        best = only_dir(out / f'finetune_{modality}') / 'best.pth.tar'
        stage(evalc + ['--dataset', dataset, '--test', best, '--ten_crop'], f'test_{modality}')
        report = json.loads(next((out / f'test_{modality}').glob('*_ten.json')).read_text())
        tests[modality] = report
    fusion_json = out / 'fusion.json'
    _, line = run([py, 'eval/merge_2stream_prob.py', '--prob1', tests['rgb']['probabilities'],
                   '--prob2', tests['flow']['probabilities'], '--output', fusion_json], log)
    commands.append(line)
    fusion = json.loads(fusion_json.read_text())

    # 5. one table
    minutes = (time.time() - t0) / 60
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != 'cpu'
               else f'{platform.processor() or platform.machine()} CPU, '
                    f'{torch.get_num_threads()} threads')
    rows = ['| retrieval (test queries train) | R@1 | R@5 | R@10 | R@20 | R@50 |',
            '|---|---|---|---|---|---|']
    for (method, modality), r in recall.items():
        rows.append(f'| {method} {modality} | ' + ' | '.join(r[f'R@{k}'] for k in (1, 5, 10, 20, 50))
                    + ' |')
    rows += ['', '| finetuned CVTCL, ten-crop test | top-1 | top-5 |', '|---|---|---|']
    for modality in ('rgb', 'flow'):
        r = tests[modality]['results']['ten']
        rows.append(f'| {modality} | {r["top1"]:.1f} | {r["top5"]:.1f} |')
    fused = fusion.get('fusion', fusion)
    rows.append(f'| two-stream fusion | {fused["top1"]:.1f} | {fused["top5"]:.1f} |')
    table = '\n'.join(rows)
    print('\n' + table)
    order = (float(recall['cvtcl', 'rgb']['R@1']) >= float(recall['infonce', 'rgb']['R@1'])
             >= float(recall['random', 'rgb']['R@1']))
    text = (f'# Demo pipeline results\n\n'
            f'`python scripts/demo_pipeline.py --profile {args.profile}` on '
            f'{datetime.date.today().isoformat()}, {machine}, {minutes:.1f} minutes in all.\n'
            f'Profile `{args.profile}`: {prof}.\n\n{table}\n\n'
            f'RGB retrieval ordering CVTCL >= InfoNCE >= random: **{"holds" if order else "does not hold"}**.\n'
            + ('On the CPU profile each pretraining stage is a few iterations long, far too short '
               'for learning to show: these rows test that the pipeline runs, not the method.\n'
               if args.profile == 'cpu' else '')
            + '\nCommands:\n\n```\n' + '\n'.join(commands) + '\n```\n')
    Path(args.results).write_text(text)
    print(f'\n=> {args.results} ({minutes:.1f} min)')


if __name__ == '__main__':
    main()
