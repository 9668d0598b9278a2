"""The whole method on the built-in demo dataset, end to end, through the real command lines:
local InfoNCE (RGB, flow) -> one CVTCL cycle -> retrieval R@k of random init / InfoNCE / CVTCL ->
a short finetune of the CVTCL networks with a ten-crop test -> two-stream fusion. Prints one
table and writes it, with the commands, the machine and the date, to docs/RESULTS.md.

    python bench/demo_pipeline.py                  # CPU profile: ~15 min on 2 cores
    python bench/demo_pipeline.py --profile gpu    # full length: ~200 epochs per stage
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

from utils.misc import UserError, run_main

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {   # pretraining and finetuning lengths (0 iterations: whole epochs), sizes
    'cpu': dict(pre_epochs=1, pre_iters=15, save_freq=1, coclr_k=64, ft_epochs=1, ft_iters=15,
                eval_freq=1, workers=2, batch=8),
    'gpu': dict(pre_epochs=200, pre_iters=0, save_freq=50, coclr_k=128, ft_epochs=30, ft_iters=0,
                eval_freq=5, workers=12, batch=32),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--profile', choices=sorted(PROFILES), default='cpu', help='stage lengths')
    p.add_argument('--output_dir', default=str(ROOT / 'experiments' / 'demo_pipeline'),
                   help='all runs of the pipeline go here (must not exist yet)')
    p.add_argument('--data_root', default=None, help='default: the project data root')
    p.add_argument('--results', default=str(ROOT / 'docs' / 'RESULTS.md'), help='markdown file')
    p.add_argument('--device', default='auto', help="every stage's --device")
    p.add_argument('--decode', choices=['cpu', 'gpu'], default='cpu', help="pretraining's --decode")
    p.add_argument('--pre_epochs', type=int, default=None, help="default: the profile's")
    args = p.parse_args()
    prof = dict(PROFILES[args.profile])
    prof['pre_epochs'] = args.pre_epochs or prof['pre_epochs']
    out = Path(args.output_dir).resolve()
    if out.exists():
        raise UserError(f'--output_dir {out} exists; remove it or choose another')
    out.mkdir(parents=True)
    log, commands, t0 = open(out / 'pipeline.log', 'w'), [], time.time()
    common = ['--device', args.device, '-j', prof['workers']] + (
        ['--data_root', args.data_root] if args.data_root else [])

    def stage(script, *flags, folder=None):
        """Run one command line of the project (into out/folder); its stdout and run folder."""
        cmd = [sys.executable, script, *flags] + (
            [*common, '--output_dir', out / folder] if folder else [])
        line = ' '.join(map(str, cmd)).replace(sys.executable, 'python').replace(f'{ROOT}/', '')
        print(f'\n$ {line}', flush=True)
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
        log.write(f'$ {line}\n{proc.stdout}\n{proc.stderr}\n')
        if proc.returncode:
            sys.exit(f'command failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}')
        commands.append(line)
        runs = sorted(d for d in (out / folder).iterdir() if d.is_dir()) if folder else []
        return proc.stdout, runs[0] if runs else None

    pre = ['--epochs', prof['pre_epochs'], '--iters_per_epoch', prof['pre_iters'],
           '--save_freq', prof['save_freq'], '--batch_size', prof['batch'], '--decode', args.decode]
    ckpt = {}
    for modality in ('rgb', 'flow'):
        ckpt['infonce', modality] = stage(
            'local_nce.py', '--config', f'configs/demo_{modality}.toml', *pre,
            folder=f'infonce_{modality}')[1] / 'last.pth.tar'
    for modality, mining in (('rgb', ('infonce', 'flow')), ('flow', ('cvtcl', 'rgb'))):
        ckpt['cvtcl', modality] = stage(
            'local_coclr.py', '--config', f'configs/demo_coclr_{modality}.toml', *pre,
            '--moco-k', prof['coclr_k'], '--pretrain', ckpt['infonce', modality], ckpt[mining],
            folder=f'cvtcl_{modality}')[1] / 'last.pth.tar'

    evalc = ['eval/main_classifier.py', '--config', 'configs/demo_finetune.toml',
             '--batch_size', prof['batch']]
    datasets, recall, tests = {'rgb': 'demo', 'flow': 'demo-f'}, {}, {}
    for modality, dataset in datasets.items():
        for method in ('random', 'infonce', 'cvtcl'):
            weights = 'random' if method == 'random' else ckpt[method, modality]
            stdout, _ = stage(*evalc, '--dataset', dataset, '--test', weights, '--retrieval',
                              folder=f'retrieval_{method}_{modality}')
            line = re.search(r'^retrieval \S+ split\d+ \(protocol \w+\): (.*)$', stdout, re.M)
            recall[method, modality] = dict(re.findall(r'(R@\d+)=([\d.]+)', line.group(1)))
    for modality, dataset in datasets.items():
        _, exp = stage(*evalc, '--dataset', dataset, '--pretrain', ckpt['cvtcl', modality],
                       '--epochs', prof['ft_epochs'], '--iters_per_epoch', prof['ft_iters'],
                       '--eval_freq', prof['eval_freq'], '--schedule',
                       folder=f'finetune_{modality}')
        stage(*evalc, '--dataset', dataset, '--test', exp / 'best.pth.tar', '--ten_crop',
              folder=f'test_{modality}')
        report = next((out / f'test_{modality}').glob('*_ten.json'))
        tests[modality] = json.loads(report.read_text())
    stage('eval/merge_2stream_prob.py', '--prob1', tests['rgb']['probabilities'], '--prob2',
          tests['flow']['probabilities'], '--output', out / 'fusion.json')
    fusion = json.loads((out / 'fusion.json').read_text())['fusion']

    minutes = (time.time() - t0) / 60
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != 'cpu'
               else f'{platform.machine()} CPU, {torch.get_num_threads()} threads')
    ks = ('R@1', 'R@5', 'R@10', 'R@20', 'R@50')
    rows = [f'| retrieval (test queries train, protocol coclr) | {" | ".join(ks)} |',
            '|---' * 6 + '|', *(f'| {m} {mod} | ' + ' | '.join(r[k] for k in ks) + ' |'
                                for (m, mod), r in recall.items())]
    rows += ['', '| finetuned CVTCL, ten-crop test | top-1 | top-5 |', '|---|---|---|']
    rows += [f'| {m} | {r["top1"]:.1f} | {r["top5"]:.1f} |' for m, r in
             [(m, tests[m]['results']['ten']) for m in datasets] + [('two-stream fusion', fusion)]]
    table = '\n'.join(rows)
    print('\n' + table)
    r1 = [float(recall[m, 'rgb']['R@1']) for m in ('cvtcl', 'infonce', 'random')]
    Path(args.results).write_text(
        f'# Demo pipeline results\n\n`python bench/demo_pipeline.py --profile {args.profile}` on '
        f'{datetime.date.today().isoformat()}, {machine}, {minutes:.1f} minutes in all.\n'
        f'Profile `{args.profile}`: {prof}.\n\n{table}\n\nRGB retrieval ordering CVTCL >= '
        f'InfoNCE >= random: **{"holds" if r1[0] >= r1[1] >= r1[2] else "does not hold"}**.\n'
        + ('On the CPU profile each pretraining stage is a few iterations long, far too short '
           'for learning to show: these rows test that the pipeline runs, not the method.\n'
           if args.profile == 'cpu' else '')
        + '\nCommands:\n\n```\n' + '\n'.join(commands) + '\n```\n')
    print(f'\n=> {args.results} ({minutes:.1f} min)')


if __name__ == '__main__':
    run_main(main)
