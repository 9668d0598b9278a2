"""Augmentation (docs/METHOD.md, Augmentation): geometry on uint8 frames where they are decoded
(boxes relative to the frame); photometric steps and normalisation batched on the device."""
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_crop(height, width, generator=None, scale=(0.2, 1.0), swap_prob=0.5, retry=False):
    """Random resized crop box ``(top, left, h, w)`` in fractions of the frame as CoCLR draws it
    (area in ``scale``, aspect uniform in [3/4, 4/3], w/h swapped with ``swap_prob``): one try,
    else the whole frame, as it trains; ``retry``: 10 tries, else the centred short-side square."""
    for _ in range(10 if retry else 1):
        area, aspect, swap = torch.rand(3, generator=generator).tolist()
        target = height * width * (scale[0] + (scale[1] - scale[0]) * area)
        aspect = 3 / 4 + (4 / 3 - 3 / 4) * aspect
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if swap < swap_prob:
            w, h = h, w
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top / height, left / width, h / height, w / width
    if not retry:
        return 0.0, 0.0, 1.0, 1.0
    s = min(height, width)
    return (height - s) // 2 / height, (width - s) // 2 / width, s / height, s / width


def box_pixels(box, height, width):
    top, left, h, w = box
    t, l = int(round(top * height)), int(round(left * width))
    return (t, l, max(1, min(int(round(h * height)), height - t)),
            max(1, min(int(round(w * width)), width - l)))


def channels_last_empty(*lead, size, device='cpu'):
    """An empty ``[*lead, 3, size, size]`` laid out ``[*lead, size, size, 3]`` in memory: views
    built so reach the model as channels-last-3D clips by a transpose, with no copy."""
    return torch.empty(*lead, size, size, 3, dtype=torch.uint8, device=device).movedim(-1, -3)


def resize(frames, size):
    """uint8 ``[N, 3, H, W]`` -> uint8 ``[N, 3, *size]``, bicubic with antialiasing (as the
    reference's PIL resize), channels-last in memory."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if frames.device.type == 'cpu':
        # uint8 channels-last images (as crops of decoded frames) directly: several times faster
        if frames.stride(-3) != 1:
            frames = frames.contiguous(memory_format=torch.channels_last)
        return F.interpolate(frames, size=size, mode='bicubic', align_corners=False, antialias=True)
    x = F.interpolate(frames.float(), size=size, mode='bicubic', align_corners=False,
                      antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resize_short_side(frames, short):
    h, w = frames.shape[-2:]
    if h <= w:
        return resize(frames, (short, max(1, round(w * short / h))))
    return resize(frames, (max(1, round(h * short / w)), short))


def flip_frames(frames, is_flow=False, negate_flow=True):
    """Horizontal flip; a flow frame's horizontal component changes sign (255 - channel 0)."""
    frames = frames.flip(-1)   # a new tensor: negating in place below touches no input
    if is_flow and negate_flow:
        frames[..., 0, :, :].bitwise_not_()   # for uint8, ~x == 255 - x, in one pass
    return frames


def _jitter(x, k, f):
    """Colour-jitter step ``k`` (brightness, contrast, saturation, hue) with factor ``f``."""
    if k == 0:
        return (f * x).clamp_(0, 1)
    if k == 3:
        return _hue(x, f)
    # ITU-R 601 luma with PIL's weights (contrast and saturation, as PIL computes them).
    gray = 0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :]
    target = gray.mean(dim=(-3, -2, -1), keepdim=True) if k == 1 else gray
    return (f * x + (1 - f) * target).clamp_(0, 1)


def _hue(x, shift):
    # RGB -> HSV, rotate the hue, -> RGB (element-wise, so it batches freely).
    r, g, b = x.unbind(-3)
    v, lo = x.max(-3)[0], x.min(-3)[0]
    delta = (v - lo).clamp(min=1e-12)
    h = torch.where(v == r, (g - b) / delta, torch.where(v == g, 2 + (b - r) / delta,
                                                         4 + (r - g) / delta))
    h = torch.where(v > lo, h / 6 % 1, 0) + shift.squeeze(-3)
    s = torch.where(v > 0, (v - lo) / v.clamp(min=1e-12), 0)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(3, 1, 1) + 6 * h.unsqueeze(-3)) % 6
    return v.unsqueeze(-3) * (1 - s.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp(0, 1))


def _gaussian_blur(x, sigma, radius):
    """Separable Gaussian blur of ``x [N, T, 3, H, W]`` with one sigma per view ``[N]``."""
    n, t, c, hh, ww = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)[:, None, :, None]   # [N*3, 1, K, 1]
    # Fold views into channels so one grouped convolution blurs each view with its own kernel.
    y = x.permute(1, 0, 2, 3, 4).reshape(t, n * c, hh, ww)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode='reflect'), k, groups=n * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode='reflect'), k.mT, groups=n * c)
    return y.reshape(t, n, c, hh, ww).permute(1, 0, 2, 3, 4)


class Photometric:
    """Strong views' photometric steps (docs/METHOD.md, Augmentation), batched: one draw per view
    (``sample``) for any number of its modalities (``apply``)."""

    def __init__(self, jitter=0.4, hue=0.1, jitter_prob=0.8, gray_prob=0.2, blur_prob=0.5):
        self.jitter, self.hue = jitter, hue
        self.jitter_prob, self.gray_prob, self.blur_prob = jitter_prob, gray_prob, blur_prob
        self.radius = 6   # of the blur kernel: 3 x the largest sigma

    def sample(self, strong, generator=None, frames=1):
        """Parameters for ``[N]`` views of ``frames`` frames, drawn where ``strong`` lives."""
        n, dev = strong.shape[0], strong.device

        def u(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(n, *shape, generator=generator, device=dev)

        j = self.jitter
        return {
            'jitter': strong & (u(0, 1) < self.jitter_prob),
            'factors': torch.stack([u(1 - j, 1 + j), u(1 - j, 1 + j), u(1 - j, 1 + j),
                                    u(-self.hue, self.hue)], 1),
            'order': torch.argsort(u(0, 1, 4), dim=1),
            'gray': strong & (u(0, 1) < self.gray_prob),
            'channel': torch.randint(0, 3, (n, frames), generator=generator, device=dev),
            'blur': strong & (u(0, 1) < self.blur_prob),
            'sigma': u(0.1, 2.0),
        }

    def apply(self, x, p, inplace=False):
        """float ``[N, T, 3, H, W]`` in [0, 1] -> same, augmented per view (in place if asked)."""
        if not inplace:
            x = x.clone()
        factors, sigma, channel = (p[k].to(x.device) for k in ('factors', 'sigma', 'channel'))
        for pos in range(4):
            for k in range(4):
                m = p['jitter'] & (p['order'][:, pos] == k)
                _on_views(x, m, lambda v, i, k=k: _jitter(v, k, factors[i, k].view(-1, 1, 1, 1, 1)))
        _on_views(x, p['gray'], lambda v, i: v.gather(2, channel[i].view(len(i), -1, 1, 1, 1)
                                                      .expand(-1, v.shape[1], 1, *v.shape[3:]))
                  .expand_as(v))
        _on_views(x, p['blur'], lambda v, i: _gaussian_blur(v, sigma[i], self.radius))
        return x


def _on_views(x, mask, fn):
    """``x[index] = fn(x[index], index)`` for the views where ``mask`` (on the host) is set: only
    those are computed (``torch.where`` over all would cost ~4x the jitter's work)."""
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    index = index.to(x.device, non_blocking=True)
    return x.index_copy_(0, index, fn(x[index], index).to(x.dtype))


def normalize(x):
    """ImageNet mean/std on ``[..., 3, H, W]`` float in [0, 1]."""
    mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


class DeviceAugment:
    """The device side of a batch: uint8 ``batch[m]`` ``[B, V, T, 3, H, W]`` and local clips
    ``batch[m + '_local']`` ``[B, 1 + L, T/L, 3, H, W]`` -> normalised float ``[B, V, 3, T, H, W]``
    / ``[B, 1 + L, 3, T/L, H, W]`` in ``memory_format``; the photometric steps on the views that
    ``batch['strong']`` / ``batch['local_strong']`` mark, one draw for a view's RGB and (if
    ``photometric_on_flow``) flow, from the augmenter's own generator (``reseed``)."""

    def __init__(self, photometric_on_flow=True, memory_format=torch.contiguous_format,
                 photometric=None, seed=0):
        self.photometric = photometric or Photometric()
        self.photometric_on_flow, self.memory_format = photometric_on_flow, memory_format
        self.reseed(seed)

    def reseed(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch, device):
        out = {}
        for suffix, flags in (('', 'strong'), ('_local', 'local_strong')):
            if flags not in batch:
                continue
            # Parameters are drawn on the CPU (a few numbers per view): selecting the views of
            # each step then needs no device-to-host read.
            lead = batch[flags].shape
            keys = [m + suffix for m in ('rgb', 'flow') if m + suffix in batch]
            params = self.photometric.sample(batch[flags].cpu().flatten(), self.generator,
                                             frames=batch[keys[0]].shape[len(lead)])
            for key in keys:
                x = batch[key].to(device, non_blocking=True)
                x = x.flatten(0, len(lead) - 1).float().div_(255)         # N x T x 3 x H x W
                if key.startswith('rgb') or self.photometric_on_flow:
                    x = self.photometric.apply(x, params, inplace=True)
                x = normalize(x).transpose(1, 2)                          # N x 3 x T x H x W
                out[key] = x.contiguous(memory_format=self.memory_format).view(*lead, *x.shape[1:])
        return out
