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
``--local_keys per_segment one_batch`` measures each path with both encodings of the local keys
(the scripts' ``--local_keys``) and prints the ratio of their step times. ``--graph_check``
asserts that graphed steps equal eager steps from the same seeds (``graph_check``); the exit
status is 1 if they do not.

    python bench/train_step.py --models infonce coclr --paths fast --local_keys per_segment one_batch
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


def make_model(kind, args, device, channels_last, local_keys='per_segment'):
    """The model the script builds (``args``: net, moco_k, bn_splits)."""
    ns = script_args(kind, '--net', args.net, '--moco-k', args.moco_k,
                     '--bn_splits', args.bn_splits, '--local_keys', local_keys,
                     '--moco-m', 0.999)
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


def path_step(model, path, device, fp32=False):
    """The step function of ``path`` for ``model``: its optimiser (fused Adam on the fast paths
    on CUDA, the for-loop one otherwise), precision (bf16 on the fast paths on CUDA unless
    ``fp32``) and CUDA graph, as the engine builds them."""
    fast = path.startswith('fast') and device.type == 'cuda'
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, fused=fast, foreach=None if fast else False)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    amp = torch.bfloat16 if fast and not fp32 else None
    step = partial(engine.train_step, model, optimizer=opt, scaler=scaler, amp_dtype=amp)
    if 'graph' in path and device.type == 'cuda':
        step = fast_path.GraphedStep(step, engine.forward_backward, optimizer_step, model, opt,
                                     scaler, amp, device)
    return step


def bench(kind, path, args, device, local_keys):
    """Seconds per step and peak GiB of one path; with ``profile``, also the device's busy
    seconds per step and the top kernels."""
    fast, cuda = path.startswith('fast'), device.type == 'cuda'
    channels_last = fast and 'ncdhw' not in path and (cuda or args.cpu_channels_last)
    torch.manual_seed(0)
    model = make_model(kind, args, device, channels_last, local_keys)
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


def record_steps(step, inputs, steps, device):
    """``(losses, generator states)``: the losses of ``steps`` calls of ``step(inputs)``, then
    the states of the host's and the device's default generators."""
    losses = [float(step(inputs)[0]) for _ in range(steps)]
    states = [torch.get_rng_state()]
    if device.type == 'cuda':
        states.append(torch.cuda.get_rng_state(device))
    return losses, states


def check_same_steps(expected, actual, rtol):
    """Raise AssertionError unless two ``record_steps`` results from the same seeds agree: every
    generator in the same state (so each step drew anew, nothing drew once on the host instead)
    and each step's loss within ``rtol`` (relative)."""
    (expected_losses, expected_states), (losses, states) = expected, actual
    same_draws = all(torch.equal(a, b) for a, b in zip(expected_states, states))
    assert same_draws, 'the generators end in other states: the steps drew other random numbers'
    far = [i for i, (a, b) in enumerate(zip(expected_losses, losses)) if abs(b - a) > rtol * abs(a)]
    assert not far, (f'losses of steps {far} differ by more than {rtol:g}: '
                     f'{expected_losses} against {losses}')


def graph_check(kind, args, device, steps=6, rtol=1e-3):
    """``steps`` graphed steps against as many eager steps from the same weights, inputs and
    seeds, both in fp32 (TF32 off, deterministic cuDNN) with the same 2D kernels, so only the
    replay differs; raises AssertionError unless ``check_same_steps`` holds and the graph was
    captured. Prints both losses and the largest weight difference at the end."""
    runs, weights_after = {}, {}
    set_tf32(strict=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        for graphed in (False, True):
            torch.manual_seed(0)
            model = make_model(kind, args, device, True)
            inputs = make_inputs(kind, args, device, True)
            fast_path.use_2d_kernels(model)   # as the graphed step's model
            step = path_step(model, 'fast-graph' if graphed else 'fast', device, fp32=True)
            if graphed:
                step.warmup = 1
            torch.manual_seed(1)
            runs[graphed] = record_steps(step, inputs, steps, device)
            assert not graphed or step.graph is not None, f'not captured: {step.failed}'
            weights_after[graphed] = torch.cat([p.detach().float().flatten()
                                                for p in model.encoder_q.parameters()])
    finally:
        set_tf32(strict=False)
        torch.backends.cudnn.deterministic = False
    diff = (weights_after[True] - weights_after[False]).abs().max().item()
    print(f'{kind} graph check ({steps} steps fp32, capture at step 2): eager losses '
          f'{runs[False][0]}; graphed {runs[True][0]}; max |weight difference| {diff:.2e}',
          flush=True)
    check_same_steps(runs[False], runs[True], rtol)
    print(f'{kind} graph check passed: the same draws, losses within {rtol:g}', flush=True)


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
    small = SimpleNamespace(**{**vars(args), 'batch_size': 2, 'bn_splits': 1})   # same FLOPs
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
    p.add_argument('--local_keys', nargs='+', default=['per_segment'],
                   choices=['per_segment', 'one_batch'],
                   help='encodings of the local keys measured (the scripts\' --local_keys)')
    p.add_argument('--graph_check', action='store_true',
                   help='assert that CUDA-graph steps equal eager steps (the same random draws, '
                        'losses within 1e-3); the exit status is 1 if not')
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
    print(f'{"model":8} {"path":16} {"local keys":12} {"s/step":>8} {"samples/s":>10} '
          f'{"GFLOP/sample":>13} {"TFLOP/s":>8} {"MFU":>6} {"peak GiB":>9} {"warm-up s":>10}')
    profiles, failed_checks = [], []
    for kind in args.models:
        flops = step_flops(kind, args, device)
        rates = {}
        if args.graph_check and device.type == 'cuda':
            try:
                graph_check(kind, args, device)
            except Exception as e:   # the timings still run; the exit status says it failed
                print(f'!!! {kind} graph check failed: {type(e).__name__}: {e}', flush=True)
                failed_checks.append(kind)
        for path in args.paths:
            for keys in args.local_keys:
                try:
                    dt, mem, warm, profile = bench(kind, path, args, device, keys)
                except Exception as e:  # one failing path must not take the others' rows with it
                    print(f'{kind:8} {path:12} {keys} failed: {type(e).__name__}: '
                          f'{str(e).splitlines()[0][:200]}', flush=True)
                    continue
                rate = args.batch_size / dt
                tflops = flops * rate / 1e12
                mfu = f'{tflops / args.peak_tflops:6.1%}' if args.peak_tflops else '     -'
                rates[path, keys] = rate
                print(f'{kind:8} {path:16} {keys:12} {dt:8.3f} {rate:10.1f} {flops / 1e9:13.1f} '
                      f'{tflops:8.2f} {mfu} {mem:9.2f} {warm:10.1f}', flush=True)
                if profile:
                    profiles.append((kind, path, dt, profile))
        for (path, keys), rate in rates.items():
            for base in ('plain', 'plain-strict'):
                if path.startswith('fast') and (base, keys) in rates:
                    print(f'{kind:8} speed-up {path}/{base} ({keys}): '
                          f'{rate / rates[base, keys]:.2f}x')
            if keys == 'per_segment' and (path, 'one_batch') in rates:
                print(f'{kind:8} {path}: step time per_segment / one_batch local keys: '
                      f'{rates[path, "one_batch"] / rate:.2f}x')
    for kind, path, dt, (busy, launches, top) in profiles:
        print(f'\n{kind} {path}, profiled: step {dt * 1e3:.1f} ms, device busy {busy * 1e3:.1f} ms '
              f'({busy / dt:.0%}), {launches:.0f} kernel launches per step; top kernels '
              f'(ms/step, launches/step):')
        for key, ms, count in top:
            print(f'  {ms:8.2f} {count:6.0f}  {key[:100]}')
    if failed_checks:
        raise SystemExit(f'graph check failed: {", ".join(failed_checks)}')


if __name__ == '__main__':
    main()
