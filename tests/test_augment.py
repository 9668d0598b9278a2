"""Augmentation (docs/METHOD.md, Data): crop sampling, per-view geometry, flow flips and the photometric step."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dataset import augment
from dataset.augment import (Photometric, box_pixels, flip_frames, normalize, resize_short_side,
                             sample_crop)
from dataset.video_dataset import apply_views
from helpers import position_frames


def crop_resize_flip(frames, box, size, flip, is_flow=False, negate_flow=True):
    """One view's geometry as the data paths apply it (``apply_views``)."""
    plan = {'frame_index': torch.arange(len(frames))[None], 'boxes': torch.tensor([box]),
            'flips': torch.tensor([flip])}
    return apply_views(list(frames), plan, 'flow' if is_flow else 'rgb', size, negate_flow)[0]


# ---------------------------------------------------------------------------------- crop boxes

def test_sample_crop_bounds_over_many_draws():
    g = torch.Generator().manual_seed(0)
    H, W = 240, 320
    areas, aspects = [], []
    for _ in range(2000):
        top, left, h, w = sample_crop(H, W, generator=g)
        assert 0 <= top and 0 <= left and top + h <= 1 + 1e-9 and left + w <= 1 + 1e-9
        hp, wp = h * H, w * W
        assert abs(hp - round(hp)) < 1e-6 and abs(wp - round(wp)) < 1e-6   # whole pixels
        if (top, left, h, w) == (0, 0, 1, 1):
            continue   # the whole frame, where the drawn box does not fit (tested below)
        areas.append(h * w)
        aspects.append(wp / hp)
    areas, aspects = torch.tensor(areas), torch.tensor(aspects)
    # Area 20-100% (up to the rounding of w and h to pixels), aspect 3/4 - 4/3 either way.
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1.0
    assert aspects.min() >= 3 / 4 * 0.97 and aspects.max() <= 4 / 3 * 1.03
    # The range is used: small and large crops, portrait and landscape (the swap).
    assert areas.min() < 0.25 and areas.max() > 0.9
    assert (aspects < 0.9).float().mean() > 0.2 and (aspects > 1.1).float().mean() > 0.2


def test_sample_crop_aspect_uniform_as_the_reference():
    # The reference draws the aspect ratio uniformly in [3/4, 4/3] (mean 1.042), not
    # log-uniformly (mean 1.014).
    g = torch.Generator().manual_seed(1)
    aspects = torch.tensor([w * 1000 / (h * 1000) for _, _, h, w in
                            (sample_crop(1000, 1000, g, scale=(0.2, 0.3), swap_prob=0.0)
                             for _ in range(4000))])
    assert abs(aspects.mean() - (3 / 4 + 4 / 3) / 2) < 0.01


def test_resize_is_antialiased_bicubic_as_pil():
    # The reference resized its crops with PIL's bicubic filter.
    import numpy as np
    from PIL import Image
    frames = position_frames(2, 60, 80)
    frames[:, :, ::3] = 255 - frames[:, :, ::3]          # detail that aliasing would show
    out = augment.resize(frames, (24, 24))
    for f, o in zip(frames, out):
        pil = Image.fromarray(f.permute(1, 2, 0).numpy()).resize((24, 24), Image.BICUBIC)
        assert (o.permute(1, 2, 0).int() - torch.from_numpy(np.array(pil)).int()).abs().max() <= 1


def test_sample_crop_reproducible():
    a = [sample_crop(100, 120, generator=torch.Generator().manual_seed(3)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert sample_crop(100, 120, generator=torch.Generator().manual_seed(4)) != a[0]


def test_sample_crop_fallbacks():
    # A 10 x 1000 strip: no crop of >= 20% area and aspect <= 4/3 fits. CoCLR's training crop
    # keeps the whole frame (squashed by the resize); the retrying crop, after its tries, resizes
    # and centre-crops, i.e. takes the centred square of the short side.
    g = torch.Generator().manual_seed(0)
    assert sample_crop(10, 1000, generator=g) == (0.0, 0.0, 1.0, 1.0)
    box = sample_crop(10, 1000, generator=g, retry=True)
    assert box == (0.0, 495 / 1000, 1.0, 10 / 1000)
    assert box_pixels(box, 10, 1000) == (0, 495, 10, 10)


def uncropped_share(height, width, scale=(0.2, 1.0), steps=100_000):
    """The share of frames CoCLR's one-attempt crop leaves whole, from its rule alone: area
    s * H * W with s ~ U(scale), aspect r ~ U[3/4, 4/3], w = round(sqrt(s H W r)) and
    h = round(sqrt(s H W / r)), swapped with p 0.5; it fits where w <= W and h <= H, i.e.
    s H W r < (W + 1/2)^2 and s H W / r < (H + 1/2)^2. Integrated over r (midpoint rule)."""
    r = 3 / 4 + (4 / 3 - 3 / 4) * (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    fits = 0.0
    for wide, tall in ((r, 1 / r), (1 / r, r)):              # as drawn, and swapped
        largest = torch.minimum((width + 0.5) ** 2 / (height * width * wide),
                                (height + 0.5) ** 2 / (height * width * tall))
        fits += 0.5 * float(((largest - scale[0]) / (scale[1] - scale[0])).clamp(0, 1).mean())
    return 1 - fits


@pytest.mark.parametrize('height,width', [(240, 320), (171, 128)])
def test_uncropped_share_is_the_rules(height, width):
    # 320 x 240: UCF101's frames, as the published LMDBs hold them (docs/METHOD.md).
    g = torch.Generator().manual_seed(height)
    n = 10_000
    whole = sum(sample_crop(height, width, g) == (0.0, 0.0, 1.0, 1.0) for _ in range(n)) / n
    expected = uncropped_share(height, width)
    assert 0.25 < expected < 0.35
    assert abs(whole - expected) < 4.5 * (expected * (1 - expected) / n) ** 0.5
    retried = sum(sample_crop(height, width, g, retry=True) == (0.0, 0.0, 1.0, 1.0)
                  for _ in range(1000))
    assert retried == 0          # the retrying crop never keeps the whole frame here


def test_box_pixels_relative_to_any_resolution():
    box = (0.25, 0.5, 0.5, 0.25)
    assert box_pixels(box, 40, 80) == (10, 40, 20, 20)
    assert box_pixels(box, 20, 40) == (5, 20, 10, 10)


# ---------------------------------------------------------------------------------- geometry

def test_crop_without_resize_is_exact_slice_and_flip_reverses():
    frames = position_frames(3, 40, 48)
    frames[:, 2] = torch.randint(0, 256, (3, 40, 48), generator=torch.Generator().manual_seed(0))
    box = (8 / 40, 12 / 48, 16 / 40, 16 / 48)          # 16 x 16 pixels at (8, 12)
    out = crop_resize_flip(frames, box, 16, flip=False)
    assert torch.equal(out, frames[..., 8:24, 12:28])
    out = crop_resize_flip(frames, box, 16, flip=True)
    assert torch.equal(out, frames[..., 8:24, 12:28].flip(-1))


def test_same_params_same_geometry_for_every_frame_and_modality():
    T = 6
    rgb = position_frames(T, 60, 80)
    flow = position_frames(T - 1, 60, 80, flow=True)         # one frame fewer
    flow_small = position_frames(T - 1, 30, 40, flow=True)   # half resolution
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        box = sample_crop(60, 80, generator=g)
        flip = trial % 2 == 1
        out_rgb = crop_resize_flip(rgb, box, 24, flip)
        out_flow = crop_resize_flip(flow, box, 24, flip, is_flow=True)
        out_small = crop_resize_flip(flow_small, box, 24, flip, is_flow=True)
        assert out_rgb.shape == (T, 3, 24, 24) and out_flow.shape == (T - 1, 3, 24, 24)
        # Every frame of the view has the same geometry (channels 0, 1 encode x, y).
        assert (out_rgb[:, :2] == out_rgb[:1, :2]).all()
        assert (out_flow[:, :2] == out_flow[:1, :2]).all()
        # Frame t is still frame t (channel 2 = 8 t).
        assert out_rgb[:, 2, 0, 0].tolist() == [8 * t for t in range(T)]
        # Flow and RGB of the view show the same region; a flipped flow frame has its
        # horizontal component negated.
        assert torch.equal(out_flow[:, 1], out_rgb[:T - 1, 1])
        assert torch.equal(out_flow[:, 0], 255 - out_rgb[:T - 1, 0] if flip else out_rgb[:T - 1, 0])
        # Flow at another resolution: the same region up to the rounding of the box to its
        # coarser pixel grid (half a pixel of it at each edge: 255 / 30 levels at most).
        x_rgb = out_rgb[0, 0].float()
        expected_x = 255 - x_rgb if flip else x_rgb
        assert (out_small[0, 0].float() - expected_x).abs().max() <= 255 / 30 + 1
        assert (out_small[0, 1].float() - out_rgb[0, 1].float()).abs().max() <= 255 / 30 + 1
        # The region is the box: the x ramp spans the box's columns, reversed when flipped.
        top, left, h, w = box
        xs = out_rgb[0, 0, 0].float()
        first, last = (xs[-1], xs[0]) if flip else (xs[0], xs[-1])
        half = w / 24 / 2                       # half an output pixel, relative to the frame
        assert abs(float(first) - 255 * (left + half)) < 4
        assert abs(float(last) - 255 * (left + w - half)) < 4
        ys = out_rgb[0, 1, :, 0].float()
        assert abs(float(ys[0]) - 255 * (top + h / 48)) < 4
        assert abs(float(ys[-1]) - 255 * (top + h - h / 48)) < 4


def test_flow_flip_negates_horizontal_component_only():
    flow = torch.randint(0, 256, (4, 3, 8, 10), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    out = flip_frames(flow, is_flow=True)
    assert torch.equal(out[:, 0], 255 - flow[:, 0].flip(-1))
    assert torch.equal(out[:, 1:], flow[:, 1:].flip(-1))
    # 128 (about no motion) stays about no motion; the input is not modified.
    assert torch.equal(flip_frames(torch.full((1, 3, 2, 2), 128, dtype=torch.uint8), True)[:, 0],
                       torch.full((1, 2, 2), 127, dtype=torch.uint8))
    assert torch.equal(flow, torch.randint(0, 256, (4, 3, 8, 10), dtype=torch.uint8,
                                           generator=torch.Generator().manual_seed(0)))
    # The reference's behaviour, behind the flag: a plain mirror.
    assert torch.equal(flip_frames(flow, is_flow=True, negate_flow=False), flow.flip(-1))
    # RGB frames are just mirrored.
    assert torch.equal(flip_frames(flow), flow.flip(-1))
    box = (0.0, 0.0, 1.0, 1.0)
    assert torch.equal(crop_resize_flip(flow, box, 8, True, is_flow=True, negate_flow=False)[:, 0],
                       crop_resize_flip(flow, box, 8, False, is_flow=True)[:, 0].flip(-1))


def test_resize_short_side():
    frames = position_frames(2, 40, 48)
    out = resize_short_side(frames, 37)
    assert out.shape == (2, 3, 37, 44) and out.dtype == torch.uint8
    assert resize_short_side(frames.transpose(-1, -2), 37).shape == (2, 3, 44, 37)
    assert resize_short_side(frames, 40) is frames


# ---------------------------------------------------------------------------------- photometric

def _video(n=2, T=3, H=12, W=14, seed=0):
    return torch.rand(n, T, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _params(n, jitter=False, factors=(1.0, 1.0, 1.0, 0.0), order=(0, 1, 2, 3), gray=False,
            blur=False, sigma=1.0, channel=(0,)):
    return {'jitter': torch.full((n,), jitter), 'factors': torch.tensor([factors] * n),
            'order': torch.tensor([order] * n), 'gray': torch.full((n,), gray),
            'channel': torch.tensor([channel] * n), 'blur': torch.full((n,), blur),
            'sigma': torch.full((n,), sigma)}


def test_weak_views_unchanged_strong_views_changed():
    photo = Photometric()
    g = torch.Generator().manual_seed(0)
    n = 64
    x = _video(n, T=2, H=10, W=10)
    strong = torch.arange(n) % 2 == 0
    p = photo.sample(strong, generator=g)
    out = photo.apply(x, p)
    assert out.shape == x.shape
    assert torch.equal(out[~strong], x[~strong])               # weak: untouched
    for key in ('jitter', 'gray', 'blur'):
        assert not p[key][~strong].any()
    touched = p['jitter'] | p['gray'] | p['blur']
    assert touched[strong].float().mean() > 0.7                 # 1 - 0.2*0.8*0.5 = 0.92
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert torch.equal(changed, touched)
    assert out.min() >= 0 and out.max() <= 1


def test_sample_probabilities():
    photo = Photometric()
    p = photo.sample(torch.ones(20000, dtype=torch.bool),
                     generator=torch.Generator().manual_seed(1))
    assert abs(p['jitter'].float().mean() - 0.8) < 0.02
    assert abs(p['gray'].float().mean() - 0.2) < 0.02
    assert abs(p['blur'].float().mean() - 0.5) < 0.02
    f = p['factors']
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4
    assert f[:, 3].min() >= -0.1 and f[:, 3].max() <= 0.1
    assert p['sigma'].min() >= 0.1 and p['sigma'].max() <= 2.0
    assert torch.equal(p['order'].sort(1).values, torch.arange(4).expand(20000, 4))
    # Random order: every op appears first.
    assert set(p['order'][:, 0].tolist()) == {0, 1, 2, 3}


def test_parameters_shared_across_frames_and_modalities():
    photo = Photometric(jitter_prob=1.0, gray_prob=0.5, blur_prob=0.5)
    n, T = 16, 4
    frame = _video(n, T=1, H=10, W=12, seed=2)
    x = frame.expand(n, T, 3, 10, 12).contiguous()              # T identical frames per view
    p = photo.sample(torch.ones(n, dtype=torch.bool), generator=torch.Generator().manual_seed(0))
    out = photo.apply(x, p)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)
    # The same params dict applied to a second modality with the same content: same result.
    other = photo.apply(x.clone(), p)
    assert torch.equal(out, other)
    # ... and views differ from each other (their parameters do).
    assert (out[0] - out[1]).abs().max() > 1e-3 or (p['factors'][0] == p['factors'][1]).all()


@pytest.mark.parametrize('on_flow', [True, False])
def test_device_augment_photometric_on_flow(on_flow):
    # The same uint8 content as RGB and flow, every view strong: with photometric_on_flow the
    # flow views get exactly the RGB views' change (one draw per view), without it none.
    g = torch.Generator().manual_seed(3)
    views = torch.randint(0, 256, (4, 2, 3, 3, 10, 10), dtype=torch.uint8, generator=g)
    batch = {'rgb': views, 'flow': views.clone(), 'strong': torch.ones(4, 2, dtype=torch.bool)}
    aug = augment.DeviceAugment(photometric_on_flow=on_flow,
                                photometric=Photometric(jitter_prob=1.0), seed=0)
    out = aug(batch, torch.device('cpu'))
    plain = normalize(views.flatten(0, 1).float() / 255).transpose(1, 2).reshape(out['rgb'].shape)
    assert out['rgb'].shape == (4, 2, 3, 3, 10, 10)
    assert (out['rgb'] - plain).abs().max() > 0.05                  # RGB is always jittered
    if on_flow:
        assert torch.equal(out['flow'], out['rgb'])
    else:
        assert torch.allclose(out['flow'], plain, atol=1e-6)


def test_hue_zero_is_identity():
    x = _video(3, T=2)
    p = _params(3, jitter=True, factors=(1.0, 1.0, 1.0, 0.0))
    assert (Photometric().apply(x, p) - x).abs().max() < 1e-5


def test_grayscale_copies_the_drawn_channel_of_each_frame():
    # As the reference's RandomGray: each frame becomes three copies of one of its channels.
    x = _video(2, T=3)
    out = Photometric().apply(x, _params(2, gray=True, channel=(2, 0, 1)))
    for t, c in enumerate((2, 0, 1)):
        assert torch.equal(out[:, t], x[:, t, c:c + 1].expand(-1, 3, -1, -1))
    p = Photometric(gray_prob=1.0).sample(torch.ones(400, dtype=torch.bool), frames=5)
    assert p['channel'].shape == (400, 5)
    assert sorted(p['channel'].unique().tolist()) == [0, 1, 2]


def test_blur_of_constant_image_is_constant():
    x = torch.full((2, 3, 3, 16, 16), 0.37)
    for sigma in (0.1, 1.0, 2.0):
        out = Photometric().apply(x, _params(2, blur=True, sigma=sigma))
        assert (out - 0.37).abs().max() < 1e-6


def test_blur_matches_torchvision():
    x = _video(1, T=2, H=20, W=24)
    photo = Photometric()
    k = 2 * photo.radius + 1
    for sigma in (0.5, 1.7):
        out = photo.apply(x, _params(1, blur=True, sigma=sigma))
        ref = TF.gaussian_blur(x[0], kernel_size=[k, k], sigma=[sigma, sigma])
        assert (out[0] - ref).abs().max() < 1e-5


# torchvision's grayscale uses 0.2989 for red, the project (like PIL, which the reference used)
# 0.299: contrast and saturation may differ by up to |1 - f| * 1e-4.
GRAY_TOL = 1e-4


@pytest.mark.parametrize('op,factor,tv,tol', [
    (0, 1.3, TF.adjust_brightness, 1e-5),
    (0, 0.6, TF.adjust_brightness, 1e-5),
    (1, 1.4, TF.adjust_contrast, GRAY_TOL),
    (1, 0.7, TF.adjust_contrast, GRAY_TOL),
    (2, 1.35, TF.adjust_saturation, GRAY_TOL),
    (2, 0.65, TF.adjust_saturation, GRAY_TOL),
    (3, 0.08, TF.adjust_hue, 1e-3),
    (3, -0.1, TF.adjust_hue, 1e-3),
])
def test_single_jitter_op_matches_torchvision(op, factor, tv, tol):
    x = _video(1, T=3, H=16, W=16, seed=op)
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[op] = factor
    out = Photometric().apply(x, _params(1, jitter=True, factors=factors))
    ref = tv(x[0], factor)                  # per frame ([T, 3, H, W] is a batch of images)
    assert (out[0] - ref).abs().max() < tol


@pytest.mark.parametrize('order', [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_jitter_chain_in_given_order_matches_torchvision(order):
    x = _video(1, T=2, H=16, W=16, seed=5)
    factors = (1.25, 0.7, 1.3, 0.06)
    out = Photometric().apply(x, _params(1, jitter=True, factors=factors, order=order))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    ref = x[0]
    for k in order:
        ref = ops[k](ref, factors[k])
    assert (out[0] - ref).abs().max() < 2e-3


def test_views_use_their_own_parameters():
    # Two views with different factors in one batch: each as if alone.
    x = _video(2, T=2, seed=9)
    p = _params(2, jitter=True)
    p['factors'] = torch.tensor([[1.3, 1.0, 1.0, 0.0], [0.7, 1.0, 1.0, 0.0]])
    out = Photometric().apply(x, p)
    assert (out[0] - TF.adjust_brightness(x[0], 1.3)).abs().max() < 1e-5
    assert (out[1] - TF.adjust_brightness(x[1], 0.7)).abs().max() < 1e-5


def test_normalize():
    x = torch.rand(2, 3, 3, 4, 4)
    out = normalize(x)
    mean = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out, (x - mean) / std)
    assert torch.allclose(out[0, 0], TF.normalize(x[0, 0], augment.IMAGENET_MEAN,
                                                  augment.IMAGENET_STD), atol=1e-6)


def test_device_augment_local_clips_one_draw_each():
    # Local clips [B, 2, L, T/L, 3, H, W]: weak clips come out only normalised; strong ones get
    # one draw each (all frames of a clip alike, clips unlike), RGB and flow the same draw.
    B, L, t = 2, 3, 2
    frame = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    clips = frame.expand(B, 2, L, t, 3, 6, 6).contiguous()
    strong = torch.tensor([[True, False, True], [False, True, True]]).expand(B, 2, L)
    batch = {'rgb_local': clips, 'flow_local': clips.clone(), 'local_strong': strong}
    aug = augment.DeviceAugment(photometric=Photometric(jitter_prob=1.0, blur_prob=0.0),
                                memory_format=torch.channels_last_3d)
    out = aug(batch, torch.device('cpu'))
    rgb = out['rgb_local']
    assert rgb.shape == (B, 2, L, 3, t, 6, 6) and 'rgb' not in out
    assert rgb.flatten(0, 2).is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out['flow_local'], rgb)
    plain = normalize(frame.float() / 255)
    strong_clips = [rgb[b, v, j] for b in range(B) for v in range(2) for j in range(L)
                    if strong[b, v, j]]
    for b in range(B):
        for v in range(2):
            for j in range(L):
                clip = rgb[b, v, j].transpose(0, 1)                     # t x 3 x H x W
                assert torch.allclose(clip[0], clip[1])                 # one draw per clip
                assert torch.allclose(clip[0], plain, atol=1e-5) != bool(strong[b, v, j])
    assert all((a - c).abs().max() > 1e-3 for k, a in enumerate(strong_clips)
               for c in strong_clips[k + 1:])
