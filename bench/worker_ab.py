"""The data-loader worker of this checkout against another checkout's, timed A/B on one LMDB.

    PYTHONPATH=. python bench/worker_ab.py OTHER_CHECKOUT [--rounds 6] [--iters 48]

``build_dataset('bench-2stream-2clip', 'train', local_segments=4)[i]`` (the sample of
``bench/data_pipeline.py``: 2 views x 32 frames x RGB and flow plus the local clips, 320x240
JPEG frames, 128 px) in a fresh process per measurement, one thread, the checkouts alternating
round by round so that the load of a shared machine falls on both alike. Each line is CPU ms per
sample; the last line the medians. This checkout is also timed with ``crop_retry=True`` (the
retrying crop) where it has that option.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import make_dataset   # noqa: E402  (beside this file)

TIMER = '''
import json, sys, time, torch
torch.set_num_threads(1)
try:
    from dataset.catalog import build_dataset
except ImportError:                       # a checkout from before dataset/catalog.py
    from dataset.video_dataset import build_dataset
root, iters, extra = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
data = build_dataset('bench-2stream-2clip', 'train', data_root=root, seq_len=32, ds=1,
                     img_dim=128, local_segments=4, **extra)
torch.manual_seed(0)
for i in range(3):
    data[i % len(data)]
t = time.process_time()
for i in range(iters):
    data[i % len(data)]
print(1000 * (time.process_time() - t) / iters)
'''


def measure(checkout, root, iters, extra):
    env = {**os.environ, 'PYTHONPATH': str(checkout), 'OMP_NUM_THREADS': '1'}
    command = [sys.executable, '-c', TIMER, root, str(iters), json.dumps(extra)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True,
                         cwd=checkout).stdout
    return float(out.split()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('other', type=Path, help='the other checkout (e.g. a `git worktree` of a '
                   'previous commit)')
    p.add_argument('--rounds', type=int, default=6)
    p.add_argument('--iters', type=int, default=48, help='timed samples per measurement')
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    sides = {'other': (args.other.resolve(), {}), 'this': (here, {}),
             'this, crop_retry': (here, {'crop_retry': True})}
    times = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as root:
        make_dataset(root, 'bench', 8, 64, 90)
        print('CPU ms/sample: ' + ' | '.join(sides))
        for _ in range(args.rounds):
            for name, (checkout, extra) in sides.items():
                times[name].append(measure(checkout, root, args.iters, extra))
            print(' | '.join(f'{times[name][-1]:.1f}' for name in sides))
    print('median: ' + ' | '.join(f'{name} {statistics.median(t):.1f}'
                                  for name, t in times.items()))


if __name__ == '__main__':
    sys.exit(main())
