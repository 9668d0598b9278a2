"""The one frame sampler (docs/METHOD.md, Sampling): a clip's frame indices, ``seq_len`` frames at
stride ``ds`` spanning ``window = seq_len * ds``."""
import torch


def min_frames(seq_len, ds, strict=False):
    """Frames a video needs to be kept: the reference drops videos of ``n <= window/2 + 1``
    frames, Kinetics ones (``strict``) of ``n <= window + 1``."""
    window = seq_len * ds
    return window + 2 if strict else window // 2 + 2


def _padded(num_frames, seq_len, ds):
    # Frames 0, ds, 2ds, ... that exist (n <= window), right-aligned; leading slots repeat frame 0.
    missing = seq_len - (num_frames + ds - 1) // ds
    return (torch.arange(seq_len) - missing).clamp(min=0) * ds


def train_indices(num_frames, seq_len, ds, generator=None):
    """Random clip: start uniform in ``[0, n - window)``, ``seq_len`` frames at stride ``ds``."""
    window = seq_len * ds
    if num_frames <= window:
        return _padded(num_frames, seq_len, ds)
    start = int(torch.randint(0, num_frames - window, (1,), generator=generator))
    return start + torch.arange(seq_len) * ds


def test_windows(num_frames, seq_len, ds):
    """Test clips of a video, ``[W, seq_len]``: every window at a step of ``window/2 - 1``."""
    window = seq_len * ds
    if num_frames <= window:
        return _padded(num_frames, seq_len, ds)[None]
    return torch.arange(num_frames).unfold(0, window, max(window // 2 - 1, 1))[:, ::ds]
