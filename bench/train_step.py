"""Training-step speed of local InfoNCE and CVTCL: the project's fast path against a plain fp32
path, side by side in one run.

    python bench/train_step.py                      # CPU here: small default size
    python bench/train_step.py --batch_size 32 --img_dim 128 --steps 10   # the issue's size (GPU)

Paths (``--paths``):
  plain         fp32, contiguous tensors, for-loop Adam, no cudnn.benchmark: the original code's
                style, with PyTorch's defaults (on a GPU cuDNN may still use TF32 for fp32
                convolutions);
  plain-strict  the same with TF32 off everywhere: true fp32 arithmetic, as on the GPUs the
                original code was written for;
  fast          the engine's eager step on this device (bf16 autocast and channels-last 3D on
                CUDA, fused Adam, cudnn.benchmark): the default on every device;
  fast-graph    fast, with the forward and backward replayed from a CUDA graph and S3D's layers
                as 2D kernels (model/fast.py): what ``--cuda_graph`` does on one GPU;
  fast-ncdhw    fast, but with contiguous (NCDHW) tensors: what channels-last is worth;
  fast-graph-ncdhw  the same for the graphed step;
  fast-compile  fast with the encoders compiled (``--compile``; compilation is not timed).
Inputs are random normalised clips already on the device, so this measures the step alone (see
bench/end_to_end.py for the data path). Prints a table: step time, samples/s, model FLOP
utilisation against --peak_tflops (measured by bench/gpu.sh), peak memory. ``--profile`` adds,
for the eager and the graphed fast path, the device's busy time per step and its most expensive
kernels: a busy time far below the step time means the step is bound by the host.
"""
import argparse
import time
from functools import partial
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import local_coclr
import local_nce
from backbone import build_backbone
import engine_pretrain as engine
from model import fast as fast_path
from utils.run import optimizer_step


PATHS = ('plain', 'plain-strict', 'fast', 'fast-graph', 'fast-ncdhw', 'fast-graph-ncdhw',
         'fast-compile')


SCRIPTS = {'infonce': local_nce, 'coclr': local_coclr}


def script_args(kind, *flags):
    """The pretraining script's own arguments: its defaults, with ``flags`` given."""
    return SCRIPTS[kind].get_parser().parse_args([str(f) for f in flags])


def make_model(kind, args, device, channels_last):
    """The model the script builds (``args``: net, moco_k, bn_splits)."""
    ns = script_args(kind, '--net', args.net, '--moco-k', args.moco_k,
                     '--bn_splits', args.bn_splits, '--moco-m', 0.999)
    model = SCRIPTS[kind].build_model(ns)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    if kind == 'coclr':  # a full queue of distinct sources, so every step trains
        model.queue_vname.copy_(torch.arange(args.moco_k, device=device) + 10 ** 6)
    return model


def make_inputs(kind, args, device, channels_last):
    g = torch.Generator(device='cpu').manual_seed(0)
    shape = (args.batch_size, 3, args.seq_len, args.img_dim, args.img_dim)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format

    def clip():
        return torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
    inputs = {'view1': clip(), 'view2': clip()}
    if kind == 'coclr':
        inputs['other_view2'] = clip()
        inputs['source'] = torch.arange(args.batch_size, device=device)
        inputs['label'] = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    return inputs


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


DEFAULT_TF32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)


def set_tf32(strict):
    """TF32 off everywhere (strict fp32), or PyTorch's defaults."""
    conv, matmul = (False, False) if strict else DEFAULT_TF32
    torch.backends.cudnn.allow_tf32 = conv
    torch.backends.cuda.matmul.allow_tf32 = matmul


def path_step(model, path, device):
    """The step function of ``path`` for ``model``: its optimiser (fused Adam on the fast paths
    on CUDA, the for-loop one otherwise), precision and CUDA graph, as the engine builds them."""
    fast = path.startswith('fast') and device.type == 'cuda'
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, fused=fast, foreach=None if fast else False)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp = torch.bfloat16 if fast else None
    step = partial(engine.train_step, model, optimizer=opt, scaler=scaler, amp_dtype=amp)
    if 'graph' in path and device.type == 'cuda':
        step = fast_path.GraphedStep(step, engine.forward_backward, optimizer_step, model, opt,
                                     scaler, amp, device)
    return step


def bench(kind, path, args, device):
    """Seconds per step and peak GiB of one path; with ``profile``, also the device's busy
    seconds per step and the top kernels."""
    fast, cuda = path.startswith('fast'), device.type == 'cuda'
    channels_last = fast and 'ncdhw' not in path and (cuda or args.cpu_channels_last)
    torch.manual_seed(0)
    model = make_model(kind, args, device, channels_last)
    if path == 'fast-compile':   # as --compile
        for encoder in (model.encoder_q, model.encoder_k):
            encoder.compile(dynamic=True)
    inputs = make_inputs(kind, args, device, channels_last)
    step = path_step(model, path, device)
    torch.backends.cudnn.benchmark = fast
    set_tf32(strict=path == 'plain-strict')
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.warmup):
        step(inputs)
    sync(device)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        loss, *_ = step(inputs)
    sync(device)
    dt = (time.perf_counter() - t) / args.steps
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float('nan')
    assert torch.isfinite(loss), f'{kind} {path}: non-finite loss'
    if isinstance(step, fast_path.GraphedStep) and step.graph is None:
        print(f'({kind} {path}: not captured: {step.failed or "too few warm-up steps"}; timed eager)')
    profile = None
    if args.profile and path in ('fast', 'fast-graph') and cuda:
        try:
            profile = device_profile(step, inputs, device)
        except Exception as e:  # the profile is a diagnostic: never lose the table for it
            print(f'(profile failed: {e!r})')
    set_tf32(strict=False)
    return dt, mem, warm, profile


def graph_check(kind, args, device, steps=6):
    """The graphed step against the eager step from the same weights, inputs and seeds: the
    losses of ``steps`` steps, and the largest weight difference at the end."""
    losses, weights_after = {}, {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = make_model(kind, args, device, True)
        inputs = make_inputs(kind, args, device, True)
        step = path_step(model, 'fast-graph' if graphed else 'fast', device)
        if graphed:
            step.warmup = 1
        torch.manual_seed(1)
        losses[graphed] = [float(step(inputs)[0]) for _ in range(steps)]
        weights_after[graphed] = torch.cat([p.detach().float().flatten()
                                            for p in model.encoder_q.parameters()])
    diff = (weights_after[True] - weights_after[False]).abs().max().item()
    print(f'{kind} graph check ({steps} steps, capture at step 2): eager losses '
          f'{[round(x, 4) for x in losses[False]]}; graphed {[round(x, 4) for x in losses[True]]}; '
          f'max |weight difference| {diff:.2e}', flush=True)


def device_profile(step, inputs, device, steps=3):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(inputs)
        sync(device)
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and
               e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1e6 / steps
    launches = sum(e.count for e in kernels) / steps
    top = sorted(kernels, key=lambda e: -e.device_time_total)[:12]
    return busy, launches, [(e.key, e.device_time_total / 1e3 / steps, e.count / steps)
                            for e in top]


def step_flops(kind, args, device):
    """FLOPs of one training step per sample, counted (forward, backward, no-grad encoders)."""
    small = SimpleNamespace(**{**vars(args), 'batch_size': 2})
    model = make_model(kind, small, device, channels_last=False)
    inputs = make_inputs(kind, small, device, channels_last=False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    with FlopCounterMode(display=False) as fc:
        engine.train_step(model, inputs, opt, scaler, None)
    return fc.get_total_flops() / 2


def backbone_forward_flops(args, device):
    net = build_backbone(args.net).to(device).eval()
    x = torch.zeros(1, 3, args.seq_len, args.img_dim, args.img_dim, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x)
    return fc.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    cuda = torch.cuda.is_available()
    p.add_argument('--device', default='cuda' if cuda else 'cpu',
                   help='default: cuda when available')
    p.add_argument('--net', default='s3d', help='backbone')
    p.add_argument('--batch_size', type=int, default=32 if cuda else 4,
                   help='samples per step (default: 32 on a GPU, 4 on the CPU)')
    p.add_argument('--seq_len', type=int, default=32, help='frames per view')
    p.add_argument('--img_dim', type=int, default=128 if cuda else 64,
                   help='crop size (default: 128 on a GPU, 64 on the CPU)')
    p.add_argument('--moco_k', type=int, default=2048, help='queue length')
    p.add_argument('--steps', type=int, default=10 if cuda else 2, help='timed steps per row')
    p.add_argument('--warmup', type=int, default=3 if cuda else 1, help='untimed steps first')
    p.add_argument('--peak_tflops', type=float, default=0.0,
                   help='measured bf16 matmul peak of the device, for the utilisation column')
    p.add_argument('--models', nargs='+', default=['infonce', 'coclr'],
                   choices=['infonce', 'coclr'], help='training steps measured')
    p.add_argument('--paths', nargs='+', default=['plain', 'fast'], choices=PATHS,
                   help='step variants measured (see the module docstring)')
    p.add_argument('--bn_splits', type=int, default=2,
                   help='shuffle-BN groups of the key batch (the engine\'s one-process default)')
    p.add_argument('--cpu_channels_last', action=argparse.BooleanOptionalAction, default=True,
                   help='on the CPU, the fast path is channels-last (the engine\'s default)')
    p.add_argument('--graph_check', action='store_true',
                   help='compare the CUDA-graph step with the eager step (losses, weights)')
    p.add_argument('--profile', action='store_true',
                   help='profile the fast paths (eager and graphed): device busy time per step, '
                        'kernel launches, top kernels')
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    fwd = backbone_forward_flops(args, device)
    print(f'device: {name}; torch {torch.__version__}; backbone {args.net} forward at '
          f'{args.seq_len}x{args.img_dim}^2: {fwd / 1e9:.2f} GFLOP per clip (counted)')
    print(f'batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, '
          f'bn_splits {args.bn_splits}\n')
    print(f'{"model":8} {"path":16} {"s/step":>8} {"samples/s":>10} {"GFLOP/sample":>13} '
          f'{"TFLOP/s":>8} {"MFU":>6} {"peak GiB":>9} {"warm-up s":>10}')
    profiles = []
    for kind in args.models:
        flops = step_flops(kind, args, device)
        rates = {}
        if args.graph_check and device.type == 'cuda':
            try:
                graph_check(kind, args, device)
            except Exception as e:
                print(f'({kind} graph check failed: {e!r})')
        for path in args.paths:
            try:
                dt, mem, warm, profile = bench(kind, path, args, device)
            except Exception as e:  # one failing path must not take the others' rows with it
                print(f'{kind:8} {path:12} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}',
                      flush=True)
                continue
            rate = args.batch_size / dt
            tflops = flops * rate / 1e12
            mfu = f'{tflops / args.peak_tflops:6.1%}' if args.peak_tflops else '     -'
            rates[path] = rate
            print(f'{kind:8} {path:16} {dt:8.3f} {rate:10.1f} {flops / 1e9:13.1f} '
                  f'{tflops:8.2f} {mfu} {mem:9.2f} {warm:10.1f}', flush=True)
            if profile:
                profiles.append((kind, path, dt, profile))
        for path in args.paths:
            if path.startswith('fast') and path in rates:
                for base in ('plain', 'plain-strict'):
                    if base in rates:
                        print(f'{kind:8} speed-up {path}/{base}: {rates[path] / rates[base]:.2f}x')
    for kind, path, dt, (busy, launches, top) in profiles:
        print(f'\n{kind} {path}, profiled: step {dt * 1e3:.1f} ms, device busy {busy * 1e3:.1f} ms '
              f'({busy / dt:.0%}), {launches:.0f} kernel launches per step; top kernels '
              f'(ms/step, launches/step):')
        for key, ms, count in top:
            print(f'  {ms:8.2f} {count:6.0f}  {key[:100]}')


if __name__ == '__main__':
    main()
