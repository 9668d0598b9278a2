"""Training-step speed of local InfoNCE and CVTCL: the project's fast path against a plain fp32
path, side by side in one run.

    python bench/train_step.py                      # CPU here: small default size
    python bench/train_step.py --batch_size 32 --img_dim 128 --steps 10   # the issue's size (GPU)

fast path = what the engine does on this device (bf16 autocast and channels-last 3D on CUDA,
fused Adam, cudnn.benchmark); plain = fp32, contiguous tensors, for-loop Adam (the original
code's style). Inputs are random normalised clips already on the device, so this measures the
step alone (see bench/end_to_end.py for the data path). Prints a table: step time, samples/s,
model FLOP utilisation against --peak_tflops (measured by bench/gpu.sh), peak memory.
"""
import argparse
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import local_coclr
import local_nce
from backbone import build_backbone
from utils.engine import train_step


def make_model(kind, args, device, fast):
    ns = SimpleNamespace(net=args.net, moco_dim=128, moco_k=args.moco_k, moco_m=0.999,
                         moco_t=0.07, num_segments=4, bn_splits=2, topk=5, self_mask_prob=0.9)
    script = local_nce if kind == 'infonce' else local_coclr
    model = script.build_model(ns)
    fmt = torch.channels_last_3d if fast else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    if kind == 'coclr':  # a full queue of distinct sources, so every step trains
        model.queue_vname.copy_(torch.arange(args.moco_k, device=device) + 10 ** 6)
    weights = ({'global': 1.0, 'inter': 1 / 3, 'intra': 1.0} if kind == 'infonce'
               else {'coclr': 1 / 3, 'inter': 1 / 3, 'intra': 1 / 3})
    return model, weights


def make_inputs(kind, args, device, fast):
    g = torch.Generator(device='cpu').manual_seed(0)
    shape = (args.batch_size, 3, args.seq_len, args.img_dim, args.img_dim)
    fmt = torch.channels_last_3d if fast else torch.contiguous_format

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


def bench(kind, fast, args, device):
    torch.manual_seed(0)
    model, weights = make_model(kind, args, device, fast)
    inputs = make_inputs(kind, args, device, fast)
    params = [p for p in model.parameters() if p.requires_grad]
    use_fused = fast and device.type == 'cuda'
    opt = torch.optim.Adam(params, lr=1e-4, fused=use_fused, foreach=False if not use_fused else None)
    amp = torch.bfloat16 if fast and device.type == 'cuda' else None
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    torch.backends.cudnn.benchmark = fast
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train_step(model, weights, inputs, opt, scaler, amp, device)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        loss, *_ = train_step(model, weights, inputs, opt, scaler, amp, device)
    sync(device)
    dt = (time.perf_counter() - t) / args.steps
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')
    assert torch.isfinite(loss), f'{kind} fast={fast}: non-finite loss'
    return dt, mem


def step_flops(kind, args, device):
    """FLOPs of one training step per sample, counted (forward, backward, no-grad encoders)."""
    small = SimpleNamespace(**{**vars(args), 'batch_size': 2})
    model, weights = make_model(kind, small, device, fast=False)
    inputs = make_inputs(kind, small, device, fast=False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    with FlopCounterMode(display=False) as fc:
        train_step(model, weights, inputs, opt, scaler, None, device)
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
    p.add_argument('--device', default='cuda' if cuda else 'cpu')
    p.add_argument('--net', default='s3d')
    p.add_argument('--batch_size', type=int, default=32 if cuda else 4)
    p.add_argument('--seq_len', type=int, default=32)
    p.add_argument('--img_dim', type=int, default=128 if cuda else 64)
    p.add_argument('--moco_k', type=int, default=2048)
    p.add_argument('--steps', type=int, default=10 if cuda else 2)
    p.add_argument('--warmup', type=int, default=3 if cuda else 1)
    p.add_argument('--peak_tflops', type=float, default=0.0,
                   help='measured bf16 matmul peak of the device, for the utilisation column')
    p.add_argument('--models', nargs='+', default=['infonce', 'coclr'])
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    fwd = backbone_forward_flops(args, device)
    print(f'device: {name}; S3D-style backbone {args.net} forward at {args.seq_len}x'
          f'{args.img_dim}^2: {fwd / 1e9:.2f} GFLOP per clip (counted)')
    print(f'batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up\n')
    print(f'{"model":8} {"path":6} {"s/step":>8} {"samples/s":>10} {"GFLOP/sample":>13} '
          f'{"TFLOP/s":>8} {"MFU":>6} {"peak GiB":>9}')
    for kind in args.models:
        flops = step_flops(kind, args, device)
        rates = {}
        for fast in (False, True):
            dt, mem = bench(kind, fast, args, device)
            rate = args.batch_size / dt
            tflops = flops * rate / 1e12
            mfu = f'{tflops / args.peak_tflops:6.1%}' if args.peak_tflops else '     -'
            rates[fast] = rate
            print(f'{kind:8} {"fast" if fast else "fp32":6} {dt:8.3f} {rate:10.1f} '
                  f'{flops / 1e9:13.1f} {tflops:8.2f} {mfu} {mem:9.2f}', flush=True)
        print(f'{kind:8} speed-up fast/fp32: {rates[True] / rates[False]:.2f}x')


if __name__ == '__main__':
    main()
