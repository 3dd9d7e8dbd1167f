"""Losses against hand-computed values (unit vectors in 2-D so distances are easy to do by hand)."""
from __future__ import annotations

import math

import pytest
import torch

from mildnet.losses import (batch_hinge, contrastive, distance, get_loss, split_triplets, triplet_correct,
                            triplet_hinge)

# Triplet 0: q=(1,0), p=(1,0), n=(0,1)  -> D(q,p)=0,   D(q,n)=sqrt2
# Triplet 1: q=(1,0), p=(0,1), n=(1,0)  -> D(q,p)=sqrt2, D(q,n)=0
Q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
P = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
N = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
R2 = math.sqrt(2)


def test_distance():
    torch.testing.assert_close(distance(Q, N), torch.tensor([R2, 0.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn, margin, expected", [
    # per triplet: max(0, 1 + 0 - R2) = 0 ; max(0, 1 + R2 - 0) = 1 + R2  -> mean (1 + R2) / 2
    (triplet_hinge, 1.0, (1 + R2) / 2),
    # batch mean first: mean(1 - R2, 1 + R2) = 1 -> max(0, 1) = 1
    (batch_hinge, 1.0, 1.0),
    # (1/2T) sum [dp^2 + max(0, 1 - dn)^2] = (1/4) [(0 + 0) + (2 + 1)] = 0.75
    (contrastive, 1.0, 0.75),
    (triplet_hinge, 0.5, (0.5 + R2) / 2),  # (0 + 0.5 + R2) / 2
])
def test_losses_hand_computed(fn, margin, expected):
    assert fn(Q, P, N, margin=margin).item() == pytest.approx(expected, abs=1e-5)


def test_batch_hinge_differs_from_per_triplet_when_mean_is_negative():
    q = torch.tensor([[1.0, 0.0]] * 2)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])  # dp=(0, R2), dn=(2, R2): terms (1-2, 1+0) = (-1, 1)
    assert batch_hinge(q, p, n).item() == pytest.approx(0.0, abs=1e-5)  # max(0, mean(-1, 1))
    assert triplet_hinge(q, p, n).item() == pytest.approx(0.5, abs=1e-5)  # mean(0, 1)


def test_gradient_finite_at_zero_distance():
    q = Q.clone().requires_grad_()
    contrastive(q, P, N).backward()
    assert torch.isfinite(q.grad).all()


def test_split_and_correct():
    q, p, n = split_triplets(torch.cat([Q, P, N]))
    assert triplet_correct(q, p, n).tolist() == [True, False]
    with pytest.raises(ValueError, match="3T rows"):
        split_triplets(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("triplet")
