"""The MoCo core: momentum update, queue, shuffle-BN, local clips, the weighted objective,
CoCLR's queue and keys."""

import pytest
import torch

from helpers import coclr_reference
from dataset.video_dataset import QUERY_SEGMENT
from model.moco import LocalCoCLR, LocalInfoNCE, split_segments


def small_input(b=4, t=8, s=32, seed=0):
    return torch.randn(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed))


def test_momentum_update():
    m = LocalInfoNCE('s3d', K=8, m=0.9)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.fill_(1.0)
        for p in m.encoder_k.parameters():
            p.zero_()
    m.momentum_update()
    for p in m.encoder_k.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.1))


def test_enqueue_wraps_around():
    m = LocalInfoNCE('s3d', dim=2, K=6)
    for step in range(4):
        keys = torch.full((3, 2), float(step))
        m.enqueue(keys)
    # steps 0,1 filled slots 0-5, step 2 overwrote 0-2, step 3 overwrote 3-5
    assert m.queue_ptr.item() == 0
    assert m.queue[0].tolist() == [2, 2, 2, 3, 3, 3]


def test_enqueue_follows_the_pointer_buffer():
    """The pointer is kept on the device only (no host copy to go stale): keys go wherever the
    ``queue_ptr`` buffer says, e.g. after a state dict was loaded."""
    m = LocalInfoNCE('s3d', dim=2, K=6)
    m.enqueue(torch.zeros(3, 2))
    m.queue_ptr.fill_(3)
    m.enqueue(torch.ones(3, 2))
    assert m.queue[0, 3:].tolist() == [1, 1, 1] and m.queue_ptr.item() == 0


def test_split_segments_order():
    x = torch.arange(2 * 8).float().view(2, 1, 8, 1, 1).expand(2, 3, 8, 2, 2).contiguous()
    seg = split_segments(x, 4)
    assert seg.shape == (8, 3, 2, 2, 2)
    # segment j of sample b holds frames 2j, 2j+1 of sample b
    assert seg[5, 0, :, 0, 0].tolist() == [10.0, 11.0]   # b=1, j=1 -> frames 2,3 of sample 1


def test_shuffle_bn_restores_order():
    torch.manual_seed(0)
    m = LocalInfoNCE('s3d', K=8, bn_splits=2)
    x = small_input()
    m.encoder_k.eval()   # running statistics: the shuffle must not change any embedding
    assert torch.allclose(m.shuffled_keys(x), m.encoder_k(x), atol=1e-5)
    m.encoder_k.train()  # batch statistics per group: differs from one group, yet stays per-sample
    k = m.shuffled_keys(x)
    assert k.shape == (4, 128)
    assert not torch.allclose(k, m.encoder_k(x), atol=1e-4)
    torch.manual_seed(1)                 # another permutation: other groups, other statistics
    assert not torch.allclose(k, m.shuffled_keys(x), atol=1e-4)


def test_batched_segments_equal_separate_calls():
    m = LocalInfoNCE('s3d', K=8).eval()
    x = small_input(b=2, t=32)
    seg = split_segments(x, 4)
    batched = m.encoder_k(seg).view(2, 4, -1)
    for j in range(4):
        single = m.encoder_k(x[:, :, 8 * j:8 * (j + 1)])
        assert torch.allclose(batched[:, j], single, atol=1e-5)


def test_local_clips_given_or_sliced_from_the_global_views():
    """q_local encodes ``local1`` and k_local the L clips of ``local2``; left None they are
    view 1's segment QUERY_SEGMENT and view 2's L segments (--local_aug shared)."""
    torch.manual_seed(0)
    m = LocalInfoNCE('s3d', K=8).eval()
    v1, v2 = small_input(2, 32, seed=1), small_input(2, 32, seed=2)
    l1, l2 = small_input(2, 8, seed=3), small_input(2, 8, seed=4)
    l2 = torch.stack([l2, l2.flip(2), -l2, l2.flip(3)], 1)          # B x L x C x T/L x H x W
    _, q_local, _, k_local = m.embed(v1, v2, l1, l2)
    with torch.no_grad():
        assert torch.allclose(q_local, m.encoder_q(l1), atol=1e-5)
        assert torch.allclose(k_local, m.encoder_k(l2.flatten(0, 1)).view(2, 4, -1), atol=1e-5)
    sliced = m.embed(v1, v2, None, None)
    query = v1[:, :, 8 * QUERY_SEGMENT:8 * (QUERY_SEGMENT + 1)]
    explicit = m.embed(v1, v2, query, torch.stack(v2.split(8, dim=2), 1))
    for a, b in zip(sliced, explicit):
        assert torch.allclose(a, b, atol=1e-5)


def test_local_keys_per_segment_or_one_batch():
    """Per segment (the default, as the authors): local clip j of the B videos is one batch, so
    BatchNorm's statistics come from one temporal position; one_batch: the B*L clips together.
    With one BN group the shuffle cannot change a batch's statistics: the keys must equal the
    key encoder's own training-mode output on exactly those batches."""
    x = small_input(2, 8, seed=1)   # views and query clip: only the local keys matter here
    l2 = torch.stack([small_input(2, 8, seed=2 + j) for j in range(4)], 1)   # B x L x C x T/L x ..
    keys = {}
    for mode in ('per_segment', 'one_batch'):
        torch.manual_seed(0)
        m = LocalInfoNCE('s3d', K=8, bn_splits=1, local_keys=mode).train()
        keys[mode] = m.embed(x, x, x, l2)[3]
        with torch.no_grad():
            if mode == 'per_segment':
                expected = torch.stack([m.encoder_k(l2[:, j]) for j in range(4)], 1)
            else:
                expected = m.encoder_k(l2.flatten(0, 1)).view(2, 4, -1)
        assert keys[mode].shape == (2, 4, 128)
        assert torch.allclose(keys[mode], expected, atol=1e-5), mode
    assert not torch.allclose(keys['per_segment'], keys['one_batch'], atol=1e-3)


def test_infonce_step_trains_query_only_and_weights_its_terms():
    torch.manual_seed(0)
    weights = {'global': 1.0, 'inter': 0.25, 'intra': 2.0}
    m = LocalInfoNCE('s3d', K=8, bn_splits=1, weights=weights)
    x1, x2 = small_input(2, 32, seed=1), small_input(2, 32, seed=2)
    loss, stats = m(x1, x2)
    assert set(stats) == {'loss_global', 'loss_inter', 'loss_intra', 'top1', 'top5', 'inter_top1'}
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    expected = sum(w * stats[f'loss_{t}'] for t, w in weights.items())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert any(p.grad is not None for p in m.encoder_q.parameters())
    assert m.queue_ptr.item() == 2
    assert 0 <= stats['top1'] <= stats['top5'] <= 1
    with pytest.raises(TypeError):
        m(x1, x2, locall=x1)                       # a misspelled input is not swallowed
    with pytest.raises(KeyError, match='inter'):   # every term needs its weight
        LocalInfoNCE('s3d', K=8, weights={'global': 1.0})(x1, x2)


def test_coclr_waits_for_full_queue_and_keeps_sampler_frozen():
    torch.manual_seed(0)
    m = LocalCoCLR(net='s3d', K=4, topk=1, bn_splits=1).train()
    assert not m.sampler.training and not m.ready
    x = small_input(2, 32)
    src, lab = torch.tensor([0, 1]), torch.tensor([0, 1])
    sampler_before = {k: v.clone() for k, v in m.sampler.state_dict().items()}
    m(x, x, x, src, lab)
    assert not m.ready                                   # 2 of 4 slots filled
    _, stats = m(x, x, x, src, lab)
    assert m.ready and 'mining_acc' not in stats          # mining starts with the next batch
    loss, stats = m(x, x, x, src, lab)
    assert 0 <= stats['mining_acc'] <= 1 and loss.requires_grad
    expected = sum(w * stats[f'loss_{t}'] for t, w in LocalCoCLR.WEIGHTS.items())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for k, v in m.sampler.state_dict().items():
        assert torch.equal(v, sampler_before[k]), k       # BN statistics untouched too
    assert m.queue_vname.tolist() == [0, 1, 0, 1]
    m.load_state_dict({**m.state_dict(), 'queue_vname': torch.full((4,), -1)})
    assert not m.ready                                    # read from the loaded queue


@pytest.mark.parametrize('cls,key', [(LocalInfoNCE, 'infonce_s3d_keys'), (LocalCoCLR, 'coclr_s3d_keys')])
def test_state_dict_keys_equal_coclr(cls, key):
    ref = coclr_reference()[key]
    m = cls(net='s3d', K=2048)
    sd = m.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == ref
    m.load_state_dict({k: torch.zeros(s, dtype=sd[k].dtype) for k, s in ref.items()}, strict=True)
