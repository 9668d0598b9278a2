"""model.fast's 2D kernels: every S3D layer run through 2D views gives what the 3D layer gives.

The 2D path is taken for channels-last clips on GPUs only, inside a graphed step; here each
layer's 2D code is called on CPU tensors and compared with the plain ``nn`` layer, on the inputs
each layer really receives in S3D (clips of 16 and 8 frames, down to 1x2x2 feature maps)."""
import copy

import pytest
import torch
from torch import nn

from backbone import build_backbone
from model import fast

CL = torch.channels_last_3d


@pytest.fixture(scope='module')
def s3d_layers():
    """(plain layer, its input) for every 3D layer of S3D in forwards of 16 and 8 frames."""
    torch.manual_seed(0)
    net = build_backbone('s3d').to(memory_format=CL).train()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].detach())))
             for m in net.modules() if type(m) in fast.FAST]
    with torch.no_grad():
        for shape in [(2, 3, 16, 64, 64), (2, 3, 8, 64, 64)]:
            net(torch.randn(shape).contiguous(memory_format=CL))
    for h in hooks:
        h.remove()
    return seen


def test_every_s3d_layer_takes_the_2d_path_with_the_same_result(s3d_layers):
    kinds = set()
    for layer, x in s3d_layers:
        assert x.is_contiguous(memory_format=CL)
        a, b = copy.deepcopy(layer), copy.deepcopy(layer)    # BatchNorm updates its statistics
        fast.use_2d_kernels(b)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = a(xa)
        out = b.forward_planes(xb)   # what the layer computes on a GPU
        assert out.shape == ref.shape and out.is_contiguous(memory_format=CL), layer
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=str(layer))
        g = torch.randn_like(ref)
        (ref * g).sum().backward()
        (out * g).sum().backward()
        # float32 sums in another order: errors relative to the gradient's scale
        for got, want, name in [(xb.grad, xa.grad, 'input')] + [
                (pb.grad, pa.grad, n) for (n, pa), pb in zip(a.named_parameters(), b.parameters())]:
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1),
                                       msg=f'{layer}: {name}')
        for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
            torch.testing.assert_close(bb, ba, msg=name)              # running statistics
        kinds.add(type(layer))
    assert kinds == set(fast.FAST)
    # the 2D path really covers S3D: every convolution is (1,k,k), (k,1,1) or pointwise
    for layer, x in s3d_layers:
        if isinstance(layer, nn.Conv3d):
            assert fast.conv3d_planes(x, layer.weight, None, layer.stride, layer.padding) \
                is not None, layer


def test_views_are_views():
    x = torch.randn(2, 5, 3, 4, 6).contiguous(memory_format=CL)
    for v in (fast.as_frames(x), fast.as_time(x)):
        assert v.data_ptr() == x.data_ptr() and v.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast.from_frames(fast.as_frames(x), 2), x)
    assert torch.equal(fast.as_frames(x)[1 * 3 + 2], x[1, :, 2])    # frame 2 of clip 1


def test_the_2d_path_is_for_channels_last_gpu_tensors_only():
    x = torch.randn(1, 3, 4, 8, 8)
    assert not fast.use_planes(x)                                     # CPU
    assert not fast.use_planes(x.contiguous(memory_format=CL))        # still the CPU
    conv = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
    ref = conv(x)
    fast.use_2d_kernels(conv)
    assert type(conv) is fast.Conv3d and torch.equal(conv(x), ref)   # the 3D kernel here


def test_the_switch_keeps_every_key_and_goes_back():
    net = build_backbone('s3d')
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    counts = {kind: sum(type(m) is kind for m in net.modules()) for kind in fast.FAST}
    assert all(n > 0 for n in counts.values())
    fast.use_2d_kernels(net)
    assert {kind: sum(type(m) is fast.FAST[kind] for m in net.modules())
            for kind in fast.FAST} == counts
    assert list(net.state_dict()) == list(keys)
    net.load_state_dict(keys, strict=True)
    fast.use_2d_kernels(net, False)
    assert not any(type(m) in fast.FAST.values() for m in net.modules())
    assert {kind: sum(type(m) is kind for m in net.modules()) for kind in fast.FAST} == counts
