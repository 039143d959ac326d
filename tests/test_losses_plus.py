"""ADTR+ losses: values against hand computation, finite gradients in the degenerate cases, and gradient direction."""

from __future__ import annotations

import math

import pytest
import torch

from adtr_deploy.train.losses_plus import (
    adtr_plus_loss,
    image_loss,
    mask_to_grid,
    phi_map,
    pixel_loss,
)

ALPHA = 0.003


def ph(*abs_diffs: float) -> float:
    """phi of one token by hand: pseudo-Huber of the mean absolute difference over channels."""
    m = sum(abs(a) for a in abs_diffs) / len(abs_diffs)
    return math.sqrt(m * m + 1) - 1


def push(x: float) -> float:
    return -math.log(1 - math.exp(-x))


def pair(diffs: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """diffs[b][token] = per-channel differences on a 1 x T grid -> (feats, rec) with feats - rec = diffs."""
    d = torch.tensor(diffs, dtype=torch.float32).permute(0, 2, 1).unsqueeze(2)  # (B, C, 1, T)
    rec = torch.linspace(-1, 1, d.numel()).reshape(d.shape)
    return rec + d, rec


def test_phi_map_is_pseudo_huber_of_channel_mean_abs_difference():
    feats, rec = pair([[[0.5, -1.5], [0.0, 0.2], [2.0, 2.0]]])
    got = phi_map(feats, rec)
    assert got.shape == (1, 1, 3)
    want = [ph(0.5, -1.5), ph(0.0, 0.2), ph(2.0, 2.0)]
    assert got.flatten().tolist() == pytest.approx(want, rel=1e-5)


def test_pixel_loss_matches_hand_computation_with_token_labels():
    # Sample 0: tokens 0,1 good, token 2 anomalous. Sample 1: all good (no push term).
    feats, rec = pair([[[0.1, 0.3], [0.4, 0.0], [1.0, 2.0]], [[0.2, 0.2], [0.0, 0.6], [0.3, 0.1]]])
    y = torch.tensor([[[0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]])  # (B, h, w) on the token grid
    p0 = [ph(0.1, 0.3), ph(0.4, 0.0), ph(1.0, 2.0)]
    p1 = [ph(0.2, 0.2), ph(0.0, 0.6), ph(0.3, 0.1)]
    l0 = (p0[0] + p0[1]) / 3 + ALPHA * push(p0[2] / 3)
    l1 = sum(p1) / 3
    assert pixel_loss(feats, rec, y, alpha=ALPHA).item() == pytest.approx((l0 + l1) / 2, rel=1e-5)


def test_masks_at_input_size_become_soft_token_fractions():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)  # 4x8 pixels -> 2x2 tokens of 2x4 pixels
    mask[0, 0, 0:2] = True  # 2 of token (0,0)'s 8 pixels
    mask[0, 2:4, 4:8] = True  # all of token (1,1)
    y = mask_to_grid(mask, (2, 2))
    assert y.tolist() == [[[0.25, 0.0], [0.0, 1.0]]]
    assert mask_to_grid(mask[:, None], (2, 2)).tolist() == y.tolist()  # the image loader's (N, 1, H, W) layout

    feats = torch.tensor([0.5, 0.1, 0.2, 1.0]).reshape(1, 1, 2, 2)
    rec = torch.zeros_like(feats)
    p = [ph(0.5), ph(0.1), ph(0.2), ph(1.0)]
    frac = [0.25, 0.0, 0.0, 1.0]
    want = sum((1 - f) * v for f, v in zip(frac, p)) / 4 + ALPHA * push(sum(f * v for f, v in zip(frac, p)) / 4)
    assert pixel_loss(feats, rec, mask, alpha=ALPHA).item() == pytest.approx(want, rel=1e-5)


def test_image_loss_matches_hand_computation_and_clamps_k():
    feats, rec = pair([[[0.1], [0.9], [0.5], [0.3]], [[1.0], [0.2], [0.7], [0.0]]])
    labels = torch.tensor([0, 1])
    p0 = sorted(ph(v) for v in (0.1, 0.9, 0.5, 0.3))
    p1 = sorted(ph(v) for v in (1.0, 0.2, 0.7, 0.0))
    q0, q1 = (p0[-1] + p0[-2]) / 2, (p1[-1] + p1[-2]) / 2
    want = (q0 + ALPHA * push(q1)) / 2  # good: pull q; anomalous: push q
    assert image_loss(feats, rec, labels, alpha=ALPHA, k=2).item() == pytest.approx(want, rel=1e-5)
    # k = 20 > 4 tokens: q is the mean over all tokens.
    q0, q1 = sum(p0) / 4, sum(p1) / 4
    want = (q0 + ALPHA * push(q1)) / 2
    assert image_loss(feats, rec, labels, alpha=ALPHA, k=20).item() == pytest.approx(want, rel=1e-5)


def test_adtr_plus_loss_combines_pixel_loss_over_masked_samples_and_image_loss_over_all():
    # Sample 0: good with a (blank) mask; 1: synthetic anomaly with mask; 2: external anomaly, no mask.
    feats, rec = pair([[[0.2], [0.4]], [[0.1], [1.5]], [[0.3], [0.8]]])
    batch = {
        "mask": torch.tensor([[[False, False]], [[False, True]], [[False, False]]]),
        "has_mask": torch.tensor([True, True, False]),
        "label": torch.tensor([0, 1, 1]),
    }
    p = [[ph(0.2), ph(0.4)], [ph(0.1), ph(1.5)], [ph(0.3), ph(0.8)]]
    px = [sum(p[0]) / 2, p[1][0] / 2 + ALPHA * push(p[1][1] / 2)]
    img = [max(p[0]), ALPHA * push(max(p[1])), ALPHA * push(max(p[2]))]
    want = 2.0 * sum(px) / 2 + 0.5 * sum(img) / 3
    got = adtr_plus_loss(feats, rec, batch, alpha=ALPHA, k=1, w_px=2.0, w_img=0.5)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # Labels only (CIFAR protocol): L_img alone.
    only = adtr_plus_loss(feats, rec, {"label": batch["label"]}, alpha=ALPHA, k=1)
    assert only.item() == pytest.approx(sum(img) / 3, rel=1e-5)


def test_adtr_plus_loss_without_labels_is_a_clear_error():
    feats, rec = pair([[[0.2], [0.4]]])
    with pytest.raises(ValueError, match="mask"):
        adtr_plus_loss(feats, rec, {})


def _grad(feats: torch.Tensor, rec: torch.Tensor, batch: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    rec = rec.clone().requires_grad_(True)
    loss = adtr_plus_loss(feats, rec, batch, **kw)
    loss.backward()
    return loss.detach(), rec.grad


@pytest.mark.parametrize(
    "case",
    [
        "all_good",
        "all_anomalous",
        "q_zero_perfect_reconstruction",
        "mask_without_positive_pixel",
        "label_only_anomalous",
    ],
)
def test_loss_and_gradients_are_finite_in_degenerate_batches(case):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 8, 4, 4, generator=g)
    rec = feats + 0.3 * torch.randn(3, 8, 4, 4, generator=g)
    mask = torch.zeros(3, 64, 64, dtype=torch.bool)
    label = torch.zeros(3, dtype=torch.int64)
    if case == "all_good":
        batch = {"mask": mask, "label": label}
    elif case == "all_anomalous":
        batch = {"mask": torch.ones_like(mask), "label": torch.ones_like(label)}
    elif case == "q_zero_perfect_reconstruction":  # anomalous samples with phi == 0 everywhere: push(0) is -log(0)
        rec = feats.clone()
        mask[:, 10:30, 10:30] = True
        batch = {"mask": mask, "label": torch.ones_like(label)}
    elif case == "mask_without_positive_pixel":  # anomalous label, empty mask
        batch = {"mask": mask, "label": torch.ones_like(label)}
    else:
        batch = {"label": torch.ones_like(label)}
    loss, grad = _grad(feats, rec, batch, k=20)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    if case != "q_zero_perfect_reconstruction":
        assert grad.abs().sum() > 0


def test_gradient_pushes_anomalous_tokens_away_and_pulls_good_tokens_together():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 16, 4, 4, generator=g)
    rec = feats + 0.5 * torch.randn(2, 16, 4, 4, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, :32, :32] = True  # sample 0: top-left 2x2 tokens anomalous; sample 1 good
    batch = {"mask": mask, "label": torch.tensor([1, 0])}
    _, grad = _grad(feats, rec, batch)
    # Descending the loss moves rec by -grad; away from feats means -grad has the sign of (rec - feats).
    away = (-grad * (rec - feats)).sum(1)  # (B, h, w): > 0 pushes the token apart, < 0 pulls it together
    anomalous = mask_to_grid(mask, (4, 4)) > 0
    assert (away[anomalous] > 0).all()
    assert (away[~anomalous] < 0).all()
    # And one small step really moves phi that way.
    step = rec - 1e-3 * grad / grad.abs().max()
    before, after = phi_map(feats, rec), phi_map(feats, step)
    assert (after[anomalous] > before[anomalous]).all()
    assert (after[~anomalous] < before[~anomalous]).all()


def test_loss_trains_a_tiny_adtr_on_real_images_with_synthetic_anomalies(real_images):
    from adtr_deploy.data.anomalies import ConfettiNoise, MixedAnomalySampler
    from adtr_deploy.data.plus_dataset import PlusDataset
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import get_preset

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = ADTR(cfg).train()
    normals = list(real_images(4, size=64, seed=3))
    sampler = MixedAnomalySampler([ConfettiNoise()], cfg.input_size, normals=normals, length=4, seed=0)
    ds = PlusDataset(normals, sampler)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        feats = model.forward_features(batch["image"])
    rec = model.reconstruct(feats)
    loss = adtr_plus_loss(feats, rec, batch)
    loss.backward()
    grads = [p.grad for p in model.transformer.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
