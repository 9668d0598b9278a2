"""Backbones against the CoCLR reference: key names, shapes, aliases and a float64 fingerprint.

The fingerprint: every tensor is filled deterministically from its key name (below), a fixed
float64 input goes through the model in eval mode, and the spatio-temporally pooled output must
equal the reference numbers recorded from the CoCLR code (tests/data/coclr_reference.json.gz).
"""

import math
import zlib

import pytest
import torch

from backbone import BACKBONES, build_backbone
from helpers import coclr_reference
from utils.misc import UserError


@pytest.fixture(scope="module")
def reference() -> dict:
    return coclr_reference()


def fingerprint_state_dict(keys: dict, alias: dict, current: dict) -> dict:
    """Deterministic tensors for every key; ``current`` supplies integer buffers."""
    state = {}
    for key, shape in keys.items():
        if alias[key] != key:
            state[key] = state[alias[key]]
            continue
        if not current[key].is_floating_point():  # num_batches_tracked keeps its value
            state[key] = current[key].clone()
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        if key.endswith("running_var"):
            value = 1 + 0.1 * r.abs()
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = 0.1 * r
        elif key.endswith("weight") and "bn" in key:
            value = 1 + 0.1 * r
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
            value = r / math.sqrt(fan_in)
        state[key] = value
    return state


def fingerprint_input() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(2, 3, 16, 64, 64, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", ["s3d", "s3dg", "r50"])   # CoCLR's (small3d is the demo's)
def test_fingerprint_matches_coclr(name, reference):
    ref = reference[name]
    model = build_backbone(name).double().eval()
    state = model.state_dict()

    # Same keys, same shapes, and (nice to have, but we keep it) the same order.
    assert list(state) == list(ref["keys"])
    for key, shape in ref["keys"].items():
        assert list(state[key].shape) == shape, key

    model.load_state_dict(fingerprint_state_dict(ref["keys"], ref["alias"], state), strict=True)
    with torch.no_grad():
        out = model(fingerprint_input())
    assert list(out.shape) == ref["out_shape"]
    assert model.feature_dim == ref["out_shape"][1]
    pooled = out.mean(dim=(2, 3, 4)).flatten()
    expected = torch.tensor(ref["pooled"], dtype=torch.float64)
    torch.testing.assert_close(pooled, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["s3d", "s3dg"])
def test_alias_keys_share_storage(name, reference):
    model = build_backbone(name)
    # Every alias in the reference is one tensor registered under two names.
    state = model.state_dict(keep_vars=True)
    for key, target in reference[name]["alias"].items():
        assert state[key] is state[target], key
    before = model.state_dict()["block1.0.conv1.weight"].clone()
    with torch.no_grad():
        model.Conv_1a.conv1.weight.add_(1.0)
    torch.testing.assert_close(model.state_dict()["block1.0.conv1.weight"], before + 1.0)
    assert model.block2[1] is model.Conv_2b and model.block3[1] is model.Mixed_3b


def test_unknown_name_lists_known_backbones():
    with pytest.raises(UserError, match="--net 'resnet18'") as err:
        build_backbone("resnet18")
    for name in BACKBONES:
        assert name in str(err.value)


@pytest.mark.parametrize("name, first_conv", [("s3d", "Conv_1a.conv1.weight"),
                                              ("s3dg", "Conv_1a.conv1.weight"),
                                              ("r50", "conv1.weight"),
                                              ("small3d", "0.weight")])
def test_in_channels(name, first_conv):
    model = build_backbone(name, in_channels=2).eval()
    assert model.state_dict()[first_conv].shape[1] == 2
    with torch.no_grad():
        out = model(torch.randn(1, 2, 8, 32, 32))
    assert out.shape[:2] == (1, model.feature_dim)


@pytest.mark.parametrize("name", BACKBONES)
def test_channels_last_and_autocast(name):
    model = build_backbone(name).eval().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 3, 8, 32, 32).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        reference_out = model(x.contiguous())
        out = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_amp = model(x)
    torch.testing.assert_close(out, reference_out, rtol=1e-4, atol=1e-5)
    assert out_amp.shape == out.shape and torch.isfinite(out_amp).all()
