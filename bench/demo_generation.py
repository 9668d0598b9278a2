"""How long building the demo dataset takes (dataset/demo.py; the budget is 30 s on 2 cores).

    python bench/demo_generation.py

Builds the demo into a temporary folder and prints the wall time, the process CPU time and the
load average (the wall time on a shared machine is inflated by the load).
"""
import os
import tempfile
import time

from dataset import demo


def main():
    with tempfile.TemporaryDirectory() as root:
        wall, cpu = time.perf_counter(), time.process_time()
        demo.ensure_demo(root, seed=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
    print(f'[demo] built {len(demo.plan(0))} videos in {wall:.1f} s wall, {cpu:.1f} s CPU '
          f'(load average {load})')


if __name__ == '__main__':
    main()
