"""Losses against hand-computed values, and the false-negative masks on a hand-made batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train.losses import Pairing, contrastive_loss, distill_loss, embedding_loss, false_negative_masks, info_nce


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 2])
    t = 0.5
    expected = 0.0
    for i, y in enumerate(labels.tolist()):
        logits = [float(q[i] @ p[j]) / t for j in range(3)]
        expected += -logits[y] + math.log(sum(math.exp(x) for x in logits))
    assert abs(float(info_nce(q, p, labels, t)) - expected / 2) < 1e-6


def test_mask_removes_a_column_from_the_denominator():
    q = F.normalize(torch.randn(3, 4), dim=-1)
    p = F.normalize(torch.randn(5, 4), dim=-1)
    labels = torch.tensor([0, 2, 4])
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3] = True
    masked = info_nce(q, p, labels, 0.1, mask)
    keep = [0, 1, 2, 4]
    row1 = F.cross_entropy((q[1:2] @ p[keep].T) / 0.1, torch.tensor([2]))
    others = F.cross_entropy((q[[0, 2]] @ p.T) / 0.1, labels[[0, 2]], reduction="sum")
    assert torch.allclose(masked, (row1 + others) / 3, atol=1e-6)


def test_labels_point_at_each_examples_positive_across_ranks():
    # rank 1 of 2, b=2 local queries, 1 hard negative each: global layout
    # [pos0 neg0 pos1 neg1 | pos2 neg2 pos3 neg3]; local queries are global 2 and 3.
    pair = Pairing(q=torch.zeros(2, 3), q_all=torch.zeros(4, 3), p_all=torch.zeros(8, 3), row0=2, group=2)
    assert pair.labels.tolist() == [4, 6]


def test_symmetric_loss_is_the_mean_of_both_directions():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1)
    p = F.normalize(torch.randn(8, 8), dim=-1)  # group 2
    pair = Pairing(q=q, q_all=q, p_all=p, row0=0, group=2)
    forward = info_nce(q, p, torch.tensor([0, 2, 4, 6]), 0.05)
    backward = info_nce(p[[0, 2, 4, 6]], q, torch.arange(4), 0.05)
    assert torch.allclose(contrastive_loss(pair, 0.05, symmetric=True), (forward + backward) / 2)
    assert torch.allclose(contrastive_loss(pair, 0.05, symmetric=False), forward)


def test_false_negative_masks_on_a_hand_made_batch():
    # Three examples (group 2: positive, negative). Example 0 and 2 share an anchor (the same
    # premise with two entailments); example 1's negative repeats example 0's positive text.
    anchors = torch.tensor([10, 11, 10])
    passages = torch.tensor([100, 101, 102, 100, 103, 104])
    mask, q_mask = false_negative_masks(anchors, passages, row0=0, b=3, group=2)
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, 3] = True  # same text as 0's positive
    expected[0, 4] = True  # positive of another copy of anchor 10
    expected[2, 0] = True  # and the other way round
    assert torch.equal(mask, expected)
    expected_q = torch.zeros(3, 3, dtype=torch.bool)
    expected_q[0, 2] = expected_q[2, 0] = True  # the same query text twice
    assert torch.equal(q_mask, expected_q)


def test_distill_loss_matches_hand_computed_kl():
    torch.manual_seed(1)
    q = F.normalize(torch.randn(2, 4), dim=-1)
    p = F.normalize(torch.randn(6, 4), dim=-1)  # group 3: [pos, neg, neg] per example
    teacher = torch.tensor([[5.0, 1.0, -2.0], [0.5, 3.0, 0.0]])
    pair = Pairing(q=q, q_all=q, p_all=p, row0=0, group=3, teacher=teacher)
    t, tt = 0.1, 2.0
    expected = 0.0
    for i in range(2):
        s = [float(q[i] @ p[3 * i + j]) / t for j in range(3)]
        log_z_s = math.log(sum(math.exp(x) for x in s))
        log_z_t = math.log(sum(math.exp(float(x) / tt) for x in teacher[i]))
        for j in range(3):
            log_pt = float(teacher[i, j]) / tt - log_z_t
            expected += math.exp(log_pt) * (log_pt - (s[j] - log_z_s))
    assert abs(float(distill_loss(pair, t, tt)) - expected / 2) < 1e-5


def test_matryoshka_adds_the_loss_of_each_renormalised_prefix():
    torch.manual_seed(2)
    q = F.normalize(torch.randn(4, 8), dim=-1)
    p = F.normalize(torch.randn(8, 8), dim=-1)
    teacher = torch.randn(4, 2)
    pair = Pairing(q=q, q_all=q, p_all=p, row0=0, group=2, teacher=teacher)

    def at(d):  # the prefix, re-normalised by hand
        qd, pd = F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1)
        return Pairing(q=qd, q_all=qd, p_all=pd, row0=0, group=2, teacher=teacher)

    def one(pr):
        return 0.2 * contrastive_loss(pr, 0.05) + 1.0 * distill_loss(pr, 0.05, 1.0)

    got = embedding_loss(pair, 0.05, infonce_weight=0.2, distill_weight=1.0, matryoshka_dims=[8, 4, 2],
                         matryoshka_weights=[1.0, 0.5, 0.25])
    expected = one(pair) + 0.5 * one(at(4)) + 0.25 * one(at(2))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(embedding_loss(pair, 0.05), contrastive_loss(pair, 0.05))  # the defaults: InfoNCE
