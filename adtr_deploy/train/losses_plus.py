"""ADTR+ losses: fine-tuning with anomalies, a pixel-level loss L_px and an image-level loss L_img (paper, "Losses").

With d = f - f_hat the feature reconstruction error (B, C, h, w) and the per-token pseudo-Huber of its channel-mean
absolute value

    phi(u) = sqrt((mean_c |d(c, u)|)^2 + 1) - 1                                    (B, h, w)

the paper's losses, per sample, are

    L_px  = mean_u[(1 - y(u)) * phi(u)] + alpha * push(mean_u[y(u) * phi(u)])     y(u): pixel labels on the token grid
    L_img = (1 - y) * q + alpha * y * push(q),   q = mean of the k largest phi(u)   y: image label
    push(x) = -log(1 - exp(-x))

Choices the paper leaves open, made here (docs/adtr_plus.md says the same):

* Pixel labels come as masks at input resolution (N, H, W) and are area-averaged to the token grid (h, w): y(u) is the
  FRACTION of the token's pixels that are anomalous, kept soft. A small defect (a confetti blob covers a fraction of a
  16x16 token) therefore still counts, in proportion to its area, instead of vanishing (threshold 0.5) or being inflated
  to whole tokens (threshold 0).
* Every mean over u is per sample (over the h*w tokens); the per-sample losses are then averaged over the batch
  (L_px over the samples that have a pixel mask, L_img over all samples).
* push(x) is -log(0) = inf at x = 0, i.e. when a sample has no anomalous pixel or its reconstruction is perfect. We
  (1) apply the push term only to samples that have anomalous pixels (L_px) / an anomalous label (L_img), by selection,
  so good samples never evaluate it (and never produce 0 * inf = nan in the forward or backward pass), and
  (2) evaluate it as -log(-expm1(-(x + eps))) with eps = 1e-6: expm1 keeps 1 - exp(-x) accurate for small x, and the
  shift by eps bounds the value (<= -log(1 - exp(-eps)) ~ 13.8) and its slope (<= 1 / eps) without a clamp's dead zone
  (a clamp to >= eps would give zero gradient for 0 < x < eps, the case where pushing matters most). The shift changes
  the loss by at most alpha * eps / x relative, far below float32 noise for realistic x.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from adtr_deploy.errors import UserError

ALPHA = 0.003  # the paper's weight of the push terms
TOP_K = 20  # the paper's k for L_img on CIFAR-10
PUSH_EPS = 1e-6


def phi_map(feats: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Pseudo-Huber of the channel-mean absolute reconstruction error: (B, C, h, w) twice -> (B, h, w), float32."""
    if feats.shape != rec.shape or feats.dim() != 4:
        raise UserError(
            f"features {tuple(feats.shape)} and reconstruction {tuple(rec.shape)} must both be (B, C, h, w)"
        )
    m = (feats.float() - rec.float()).abs().mean(dim=1)  # (B, h, w)
    return torch.sqrt(m * m + 1.0) - 1.0


def push(x: torch.Tensor, eps: float = PUSH_EPS) -> torch.Tensor:
    """-log(1 - exp(-x)) made finite: evaluated at x + eps with expm1 (see the module docstring). x >= 0."""
    return -torch.log(-torch.expm1(-(x + eps)))


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Masks (N, H, W) or (N, 1, H, W), bool/float at input size -> soft pixel labels (N, h, w) in [0, 1]: the anomalous
    fraction of each token.

    Adaptive average pooling is an exact area average when H, W are multiples of h, w (224 -> 14: 16x16 pixels per token)
    and a close one otherwise. Masks already at (h, w) pass through unchanged.
    """
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]  # (N, H, W): the training loop's image loader stacks masks as (N, 1, H, W)
    if mask.dim() != 3:
        raise UserError(f"masks must be (N, H, W) or (N, 1, H, W), got {tuple(mask.shape)}")
    y = mask.float().clamp(0.0, 1.0).unsqueeze(1)  # (N, 1, H, W)
    return F.adaptive_avg_pool2d(y, grid).squeeze(1)  # (N, h, w)


def pixel_loss_per_sample(phi: torch.Tensor, y: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """L_px of each sample from phi (B, h, w) and soft pixel labels y (B, h, w) on the same grid -> (B,)."""
    pull = ((1.0 - y) * phi).flatten(1).mean(1)  # (B,)
    x = (y * phi).flatten(1).mean(1)  # (B,)
    has_anomaly = y.flatten(1).sum(1) > 0
    # Select, do not multiply: good samples never evaluate the push term (see module docstring).
    safe_x = torch.where(has_anomaly, x, torch.ones_like(x))
    return pull + torch.where(has_anomaly, alpha * push(safe_x), torch.zeros_like(x))


def pixel_loss(
    feats: torch.Tensor, rec: torch.Tensor, pixel_labels: torch.Tensor, alpha: float = ALPHA
) -> torch.Tensor:
    """Batch mean of L_px. pixel_labels: masks (B, H, W) at input size or (B, h, w) on the token grid, bool or float."""
    phi = phi_map(feats, rec)
    y = mask_to_grid(pixel_labels.to(phi.device), tuple(phi.shape[-2:]))
    return pixel_loss_per_sample(phi, y, alpha).mean()


def topk_mean(phi: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """q: mean of the k largest phi(u) of each sample, (B, h, w) -> (B,). k is clamped to [1, h*w] (64 px input: 16 tokens)."""
    flat = phi.flatten(1)  # (B, h*w)
    k = max(1, min(int(k), flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def image_loss_per_sample(
    phi: torch.Tensor, labels: torch.Tensor, alpha: float = ALPHA, k: int = TOP_K
) -> torch.Tensor:
    """L_img of each sample from phi (B, h, w) and image labels (B,) (0 good, 1 anomalous) -> (B,)."""
    q = topk_mean(phi, k)
    y = labels.to(device=q.device, dtype=q.dtype).reshape(-1)
    anomalous = y > 0
    safe_q = torch.where(anomalous, q, torch.ones_like(q))
    return (1.0 - y) * q + torch.where(anomalous, alpha * y * push(safe_q), torch.zeros_like(q))


def image_loss(
    feats: torch.Tensor, rec: torch.Tensor, image_labels: torch.Tensor, alpha: float = ALPHA, k: int = TOP_K
) -> torch.Tensor:
    """Batch mean of L_img. image_labels (B,): 0 good, 1 anomalous (bool, int or float)."""
    return image_loss_per_sample(phi_map(feats, rec), image_labels, alpha, k).mean()


def adtr_plus_loss(
    feats: torch.Tensor,
    rec: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    alpha: float = ALPHA,
    k: int = TOP_K,
    w_px: float = 1.0,
    w_img: float = 1.0,
) -> torch.Tensor:
    """The ADTR+ training loss of one batch: w_px * L_px + w_img * L_img (scalar).

    batch keys (the plus_dataset yields all three; any subset that defines the labels works):
      "mask"     (B, H, W) or (B, 1, H, W) bool/float pixel labels at input size (zeros for good images);
      "has_mask" (B,) bool, which samples' masks are real labels; default: all of them when "mask" is given. Samples
                 without one (external / image-level anomalies) take no part in L_px;
      "label"    (B,) image labels; default: mask.any() per sample.
    L_px is averaged over the samples with a mask, L_img over all samples. A batch without "mask" gets L_img only.
    """
    phi = phi_map(feats, rec)  # (B, h, w)
    b = phi.shape[0]
    mask = batch.get("mask")
    labels = batch.get("label")
    if mask is None and labels is None:
        raise UserError('an ADTR+ batch needs "mask" and/or "label"; the ADTR+ data set provides both')
    if labels is None:
        labels = mask.flatten(1).to(torch.bool).any(1)
    total = w_img * image_loss_per_sample(phi, labels.to(phi.device), alpha, k).mean()
    if mask is not None:
        has_mask = batch.get("has_mask")
        has_mask = torch.ones(b, dtype=torch.bool) if has_mask is None else has_mask.to(torch.bool)
        has_mask = has_mask.to(phi.device).reshape(-1)
        if bool(has_mask.any()):
            y = mask_to_grid(mask.to(phi.device), tuple(phi.shape[-2:]))
            px = pixel_loss_per_sample(phi[has_mask], y[has_mask], alpha)
            total = total + w_px * px.mean()
    return total
