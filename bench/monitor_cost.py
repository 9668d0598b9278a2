"""What the retrieval monitor costs against training, per video, measured side by side.

    python bench/monitor_cost.py [--config configs/demo_rgb.toml] [--steps 6] [--videos 24]
                                 [any flag of local_nce.py, e.g. --device cuda --workers 8]
    python bench/monitor_cost.py --net s3d --seq_len 32 --img_dim 64   # UCF101's network

Training: two epochs of ``--steps`` steps of the config's run in this process (the monitor
off), seconds per training video from the engine's own ``samples_per_s`` of the second. Monitor: ``engine_pretrain.Monitor``, the
code a run calls, on ``--videos`` videos of each split (spread over the classes), with the middle
window and with every window, seconds per video. Printed: both, their ratio, and what one
measurement costs a run of ``--monitor_freq N`` on UCF101 split 1 (9,537 train and 3,783 test
videos, about 11 windows of 32 frames each on average):

    share of training time = (9537 + 3783) * windows * monitor_s / (N * 9537 * train_s)

(``monitor_s``: seconds per video of one window, ``train_s``: per training video). The demo's clips
are 64 px where UCF101's are 128, which scales both sides alike.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import engine_pretrain as engine
import local_nce
from eval import clips
from utils import distributed as du
from utils.config import parse_args

UCF_TRAIN, UCF_TEST, UCF_WINDOWS = 9537, 3783, 11


def train_seconds_per_video(flags, steps, out):
    """From the second of two epochs of ``steps`` steps (the workers already started)."""
    exp = local_nce.main([*flags, '--epochs', '2', '--iters_per_epoch', str(steps),
                          '--monitor_freq', '0', '--output_dir', out])
    record = json.loads((Path(exp) / 'log.jsonl').read_text().splitlines()[-1])
    return 1 / record['samples_per_s']


def monitor_seconds_per_video(flags, videos, windows):
    args = parse_args(local_nce.get_parser(), [*flags, '--monitor_windows', windows])
    rt = clips.runtime(du.init_distributed(args.device), args)
    monitor = engine.Monitor(args, rt, [])
    monitor.videos = {part: clips.Videos(v.dataset, [v.indices[i] for i in
                                                     clips.spread_indices(len(v), videos)])
                      for part, v in monitor.videos.items()}
    model = local_nce.build_model(args).to(rt.device, memory_format=rt.memory_format)
    monitor(model, -1, None)   # warm-up: first calls, worker start
    tic = time.perf_counter()
    monitor(model, -1, None)
    return (time.perf_counter() - tic) / sum(len(v) for v in monitor.videos.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default='configs/demo_rgb.toml', help="the run's config")
    p.add_argument('--steps', type=int, default=6, help='training steps timed')
    p.add_argument('--videos', type=int, default=24, help='videos of each split the monitor reads')
    ours, rest = p.parse_known_args()
    flags = ['--config', ours.config, *rest]
    with tempfile.TemporaryDirectory() as out:
        train_s = train_seconds_per_video(flags, ours.steps, out)
    middle = monitor_seconds_per_video(flags, ours.videos, 'middle')
    every = monitor_seconds_per_video(flags, ours.videos, 'all')
    print(f'training: {train_s:.3f} s per video; monitor: {middle:.3f} s per video (middle '
          f'window), {every:.3f} s (every window)')
    ratio = middle / train_s
    print(f'one window per video costs {ratio:.3f} training videos')
    for n in (1, 5, 10, 20):
        for name, windows in (('middle', 1), ('all', UCF_WINDOWS)):
            share = (UCF_TRAIN + UCF_TEST) * windows * ratio / (n * UCF_TRAIN)
            print(f'UCF101, --monitor_freq {n:2d}, --monitor_windows {name:6s}: '
                  f'{100 * share:6.1f} % of training time')


if __name__ == '__main__':
    main()
