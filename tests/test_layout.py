"""backbone.layout: every S3D layer run through 2D views gives what the 3D layer gives.

The 2D path is taken on GPUs only, where the engine enables it for graphed steps; here each layer's
``forward_planes`` (the code the GPU runs) is called on CPU tensors and compared with the parent ``nn`` layer, on the inputs each layer
really receives in S3D (clips of 16 and 8 frames, down to 1x2x2 feature maps)."""
import copy

import pytest
import torch
from torch import nn

from backbone import build_backbone, layout

CL = torch.channels_last_3d


def layer_inputs(net, shapes):
    """(layer, its input) for every layout layer of ``net`` in forwards of clips ``shapes``."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].detach())))
             for m in net.modules()
             if isinstance(m, (layout.Conv3d, layout.BatchNorm3d, layout.MaxPool3d))]
    with torch.no_grad():
        for shape in shapes:
            net(torch.randn(shape).contiguous(memory_format=CL))
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope='module')
def s3d_layers():
    torch.manual_seed(0)
    net = build_backbone('s3d').to(memory_format=CL).train()
    return layer_inputs(net, [(2, 3, 16, 64, 64), (2, 3, 8, 64, 64)])


PARENT = {layout.Conv3d: nn.Conv3d, layout.BatchNorm3d: nn.BatchNorm3d,
          layout.MaxPool3d: nn.MaxPool3d}


def test_every_s3d_layer_takes_the_2d_path_with_the_same_result(s3d_layers):
    kinds = set()
    for layer, x in s3d_layers:
        assert x.is_contiguous(memory_format=CL)
        a, b = copy.deepcopy(layer), copy.deepcopy(layer)    # BatchNorm updates its statistics
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = PARENT[type(layer)].forward(a, xa)
        out = b.forward_planes(xb)
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
    assert kinds == set(PARENT)
    # the 2D path really covers S3D: every convolution is (1,k,k), (k,1,1) or pointwise
    for layer, x in s3d_layers:
        if isinstance(layer, layout.Conv3d):
            assert layout.conv3d_planes(x, layer.weight, None, layer.stride, layer.padding) \
                is not None, layer


def test_views_are_views():
    x = torch.randn(2, 5, 3, 4, 6).contiguous(memory_format=CL)
    for v in (layout.as_frames(x), layout.as_time(x)):
        assert v.data_ptr() == x.data_ptr() and v.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(layout.from_frames(layout.as_frames(x), 2), x)
    assert torch.equal(layout.as_frames(x)[1 * 3 + 2], x[1, :, 2])    # frame 2 of clip 1


def test_the_2d_path_is_for_channels_last_gpu_tensors_only():
    x = torch.randn(1, 3, 4, 8, 8)
    assert not layout.use_planes(x)                                     # CPU
    assert not layout.use_planes(x.contiguous(memory_format=CL))        # still the CPU
    conv = layout.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
    assert torch.equal(conv(x), nn.Conv3d.forward(conv, x))


def test_checkpoint_keys_are_the_nn_layers_keys():
    a = nn.Sequential(nn.Conv3d(3, 4, 1, bias=False), nn.BatchNorm3d(4))
    b = nn.Sequential(layout.Conv3d(3, 4, 1, bias=False), layout.BatchNorm3d(4))
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict(), strict=True)


def test_use_2d_kernels_switches_every_layout_layer():
    net = build_backbone('s3d')
    layers = [m for m in net.modules()
              if isinstance(m, (layout.Conv3d, layout.BatchNorm3d, layout.MaxPool3d))]
    assert len(layers) > 100 and not any(m.planes for m in layers)    # off by default
    layout.use_2d_kernels(net)
    assert all(m.planes for m in layers)
    layout.use_2d_kernels(net, False)
    assert not any(m.planes for m in layers)


@pytest.mark.parametrize('kernel,stride,padding', [
    ((1, 7, 7), (1, 2, 2), (0, 3, 3)),     # S3D's first convolution
    ((3, 1, 1), (1, 1, 1), (1, 0, 0)),
    ((3, 3, 3), (1, 1, 1), (1, 1, 1))])    # no 2D path: the 3D layer, unpadded
def test_padded_input_channels_give_the_same_convolution(kernel, stride, padding):
    torch.manual_seed(0)
    conv = layout.Conv3d(3, 16, kernel, stride, padding, bias=False).to(memory_format=CL)
    padded = copy.deepcopy(conv)
    padded.pad_channels = 8
    x = torch.randn(2, 3, 6, 20, 20).contiguous(memory_format=CL)
    xp, wp = layout.pad_channels(x, conv.weight, 8)
    assert xp.shape[1] == wp.shape[1] == 8 and xp.is_contiguous(memory_format=CL)
    assert torch.equal(xp[:, :3], x) and not xp[:, 3:].any() and not wp[:, 3:].any()
    ref = nn.Conv3d.forward(conv, x)
    out = padded.forward_planes(x)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert padded.weight.grad.shape == conv.weight.shape
    torch.testing.assert_close(padded.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
