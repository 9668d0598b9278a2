"""The losses (docs/METHOD.md, Losses) against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from dataset.video_dataset import QUERY_SEGMENT
from model import losses


def test_global_infonce_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0]])        # D x K: columns (0,1) and (1,0)
    logits = losses.global_logits(q, k, queue, tau=0.5)
    # [q.k, q.queue] / tau = [0.6, 0, 1] / 0.5
    assert torch.allclose(logits, torch.tensor([[1.2, 0.0, 2.0]]))
    # -1.2 + log(e^1.2 + e^0 + e^2) = -1.2 + log(11.70916) = 1.2603726
    assert losses.info_nce(logits).item() == pytest.approx(1.2603726, abs=1e-6)


def test_inter_and_intra_by_hand():
    q_local = torch.tensor([[1.0, 0.0]])                  # B=1, D=2
    k_local = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])    # L=2 segments
    queue = torch.tensor([[0.6], [0.8]])                  # K=1
    inter, intra, top1 = losses.local_losses(q_local, k_local, queue, tau=1.0)
    # inter rows: [1, 0.6] -> -1 + log(e + e^0.6) = 0.5130153; [0, 0.6] -> log(1 + e^0.6) = 1.0374880
    assert inter.item() == pytest.approx((0.5130153 + 1.0374880) / 2, abs=1e-6)
    # intra row (j=2): [q.k1, q.k2] = [1, 0] -> -1 + log(e + 1) = 0.3132617
    assert intra.item() == pytest.approx(0.3132617, abs=1e-6)
    # segment 1 (1 > 0.6) beats the queue, segment 2 (0 < 0.6) does not
    assert top1.item() == pytest.approx(0.5)


def test_inter_equals_explicit_rows():
    g = torch.Generator().manual_seed(0)
    B, L, D, K = 3, 4, 8, 5
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    kl = torch.nn.functional.normalize(torch.randn(B, L, D, generator=g), dim=2)
    queue = torch.nn.functional.normalize(torch.randn(D, K, generator=g), dim=0)
    inter, intra, _ = losses.local_losses(q, kl, queue, tau=0.1)
    rows = [torch.cat([(q[b] @ kl[b, j])[None], q[b] @ queue]) / 0.1 for b in range(B) for j in range(L)]
    explicit = losses.info_nce(torch.stack(rows))
    assert inter.item() == pytest.approx(explicit.item(), rel=1e-5)
    # intra: the query's own segment (QUERY_SEGMENT) against each other segment of the video
    own = QUERY_SEGMENT
    rows = [torch.stack([q[b] @ kl[b, own], q[b] @ kl[b, j]]) / 0.1
            for b in range(B) for j in range(L) if j != own]
    assert intra.item() == pytest.approx(losses.info_nce(torch.stack(rows)).item(), rel=1e-5)


def test_multi_positive_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True]])
    # log(e + e^2 + e^3) - log(e + e^3) = 0.2806780
    assert losses.multi_positive_nce(logits, mask).item() == pytest.approx(0.2806780, abs=1e-6)
    # a single positive at 0 is plain InfoNCE
    only_self = torch.tensor([[True, False, False]])
    assert losses.multi_positive_nce(logits, only_self).item() == pytest.approx(
        losses.info_nce(logits).item())


def test_coclr_mask_siblings_topk_and_self():
    # Queue of K=4 entries; row 0 has source 7, a sibling at queue slot 2.
    source = torch.tensor([7, 9])
    queue_source = torch.tensor([1, 2, 7, 3])
    # Sampler space: row 0 is closest to slots 2 (sibling, excluded from ranking), then 0, then 3.
    sampler_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue_second = torch.tensor([[0.9, 0.1, 1.0, 0.5],
                                 [0.0, 0.2, 0.0, 0.8]])
    mask, top = losses.coclr_positive_mask(sampler_emb, queue_second, source, queue_source,
                                           topk=1, mask_self=False)
    assert top.tolist() == [[0], [3]]
    assert mask.tolist() == [[True, True, False, True, False],    # self, mined 0, sibling 2
                             [True, False, False, False, True]]   # self, mined 3
    masked, _ = losses.coclr_positive_mask(sampler_emb, queue_second, source, queue_source,
                                           topk=1, mask_self=True)
    assert masked[:, 0].tolist() == [False, False]                # both rows have other positives
    # No mining (queue not full yet, or --topk 0): siblings only; a row without siblings keeps
    # its self positive.
    early, top = losses.coclr_positive_mask(sampler_emb, queue_second, source, queue_source,
                                            topk=0, mask_self=True)
    assert top is None
    assert early.tolist() == [[False, False, False, True, False], [True, False, False, False, False]]


def test_losses_are_finite_with_extreme_logits():
    logits = torch.tensor([[100.0, -100.0, 50.0]])
    mask = torch.tensor([[False, True, False]])
    assert math.isfinite(losses.multi_positive_nce(logits, mask).item())
