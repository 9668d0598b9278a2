"""Exact frame indices of the one frame sampler (docs/METHOD.md, Data)."""
import pytest
import torch

from dataset.sampler import min_frames, train_indices
from dataset.sampler import test_windows as windows   # imported as test_* pytest would collect it


def _starts(n, T, ds, draws, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        idx = train_indices(n, T, ds, generator=g)
        assert idx.dtype == torch.long and idx.shape == (T,)
        assert torch.equal(idx, idx[0] + torch.arange(T) * ds)   # stride ds, no padding
        out.append(int(idx[0]))
    return out


@pytest.mark.parametrize('n,T,ds', [(40, 32, 1), (100, 32, 1), (70, 16, 4), (33, 32, 1)])
def test_train_start_range_and_stride(n, T, ds):
    window = T * ds
    starts = _starts(n, T, ds, draws=400)
    # Start uniform in [0, n - window): every start reachable, none outside.
    assert set(starts) == set(range(n - window))
    assert max(starts) + (T - 1) * ds < n


def test_train_indices_exact_example():
    g = torch.Generator().manual_seed(0)
    idx = train_indices(100, 4, 3, generator=g)
    start = int(idx[0])
    assert idx.tolist() == [start, start + 3, start + 6, start + 9]
    assert 0 <= start < 100 - 12


def test_train_reproducible_with_seeded_generator():
    a = _starts(500, 32, 2, draws=20, seed=7)
    b = _starts(500, 32, 2, draws=20, seed=7)
    c = _starts(500, 32, 2, draws=20, seed=8)
    assert a == b and a != c


def test_train_pads_short_video_on_the_left():
    # n = 20 <= window 32: twelve copies of frame 0, then 0..19.
    idx = train_indices(20, 32, 1, generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == [0] * 12 + list(range(20))
    # n == window exactly: no random start exists ([0, 0) is empty), the whole video is used.
    assert train_indices(32, 32, 1).tolist() == list(range(32))


def test_train_pads_with_stride():
    # ds = 2, T = 32 (window 64). Frames 0, 2, ..., that exist, right-aligned.
    assert train_indices(20, 32, 2).tolist() == [0] * 22 + list(range(0, 20, 2))
    assert train_indices(21, 32, 2).tolist() == [0] * 21 + list(range(0, 21, 2))
    assert train_indices(64, 32, 2).tolist() == list(range(0, 64, 2))
    # T = 4, ds = 2 (window 8), n = 5: frames 0, 2, 4 exist -> [0, 0, 2, 4].
    assert train_indices(5, 4, 2).tolist() == [0, 0, 2, 4]
    # n = 1: everything is frame 0.
    assert train_indices(1, 4, 2).tolist() == [0, 0, 0, 0]


def test_test_windows_step():
    # window 32, step 32/2 - 1 = 15: starts 0, 15, 30, 45, 60 (60 + 32 <= 100 < 75 + 32).
    w = windows(100, 32, 1)
    assert w.shape == (5, 32)
    assert w[:, 0].tolist() == [0, 15, 30, 45, 60]
    assert torch.equal(w, w[:, :1] + torch.arange(32)[None])
    # ds = 2: window 64, step 31; n = 200 -> starts 0, 31, ..., 124 (124 + 64 <= 200).
    w = windows(200, 32, 2)
    assert w[:, 0].tolist() == [0, 31, 62, 93, 124]
    assert torch.equal(w, w[:, :1] + 2 * torch.arange(32)[None])
    assert int(w.max()) < 200


@pytest.mark.parametrize('n', [33, 46, 47, 48, 150])
def test_test_windows_cover_valid_range(n):
    w = windows(n, 32, 1)
    starts = w[:, 0].tolist()
    assert starts == list(range(0, n - 32 + 1, 15))
    assert int(w.max()) <= n - 1


def test_test_windows_pad_short_video():
    w = windows(20, 32, 1)
    assert w.shape == (1, 32)
    assert w[0].tolist() == [0] * 12 + list(range(20))
    assert windows(32, 32, 1).tolist() == [list(range(32))]
    assert windows(20, 32, 2).tolist() == [[0] * 22 + list(range(0, 20, 2))]


def test_test_windows_tiny_window_step_at_least_one():
    # window 2: 2/2 - 1 = 0 would never advance; the step is at least 1.
    assert windows(5, 2, 1).tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]


def test_min_frames():
    # Normal: drop n <= window/2 + 1, so the minimum is window/2 + 2.
    assert min_frames(32, 1) == 18
    assert min_frames(32, 2) == 34
    assert min_frames(8, 1) == 6
    assert min_frames(15, 1) == 9           # odd window: n > 8.5 -> n >= 9
    # Strict (Kinetics): drop n <= window + 1.
    assert min_frames(32, 1, strict=True) == 34
    assert min_frames(32, 2, strict=True) == 66
