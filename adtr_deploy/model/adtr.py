"""ADTR: a frozen pretrained CNN, and a transformer that reconstructs its features; the reconstruction error is the anomaly map.

`ADTR.forward` IS the inference graph that gets exported (TorchScript, ONNX, TensorRT) and tested for parity: uint8 RGB images
(N, H, W, 3) in, anomaly map (N, 1, H, W) and image score (N,) out, float32. It has no Python branches on tensor values and
every shape is static except the batch axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adtr_deploy.model.config import ADTRConfig
from adtr_deploy.model.efficientnet import build_efficientnet


class Attention(nn.Module):
    """Multi-head attention written with plain matmul/softmax, so every exporter sees the same simple ops."""

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead = nhead
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt(d_model // nhead)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = self.nhead
        q = self.q_proj(q).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Lq, dh)
        k = self.k_proj(k).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Lk, dh)
        v = self.v_proj(v).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Lk, dh)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)  # (B, h, Lq, Lk)
        out = self.dropout(attn) @ v  # (B, h, Lq, dh)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, Lq, d)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer; the positional embedding is added to queries and keys, not values."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src)))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention over the queries, cross-attention into the encoder memory, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout)
        self.cross_attn = Attention(d_model, nhead, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = tgt + pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt)))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(tgt + pos, memory + pos, memory)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class LearnedPositionEmbedding(nn.Module):
    """2-D learned position embedding: a row table and a column table of d/2 dims each, concatenated (UniAD's layout)."""

    def __init__(self, grid: tuple[int, int], d_model: int):
        super().__init__()
        self.grid = grid
        self.row_embed = nn.Embedding(grid[0], d_model - d_model // 2)
        self.col_embed = nn.Embedding(grid[1], d_model // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        h, w = self.grid
        col = self.col_embed.weight.unsqueeze(0).expand(h, w, -1)  # (h, w, d/2)
        row = self.row_embed.weight.unsqueeze(1).expand(h, w, -1)  # (h, w, d/2)
        return torch.cat([col, row], dim=-1).flatten(0, 1)  # (h*w, d)


class ReconstructionTransformer(nn.Module):
    """Encoder over the projected features; the decoder's input is the learnable auxiliary query, the memory is the encoder."""

    def __init__(self, cfg: ADTRConfig, channels: int):
        super().__init__()
        d, grid = cfg.d_model, cfg.grid
        self.input_proj = nn.Linear(channels, d)  # the paper's 1x1 conv, per token
        self.output_proj = nn.Linear(d, channels)
        self.pos_embed = LearnedPositionEmbedding(grid, d)
        self.query_embed = nn.Embedding(grid[0] * grid[1], d)
        args = (d, cfg.nhead, cfg.dim_feedforward, cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*args) for _ in range(cfg.num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        # Fixed per-channel standardization of the tokens in, undone on the way out: set from the training features
        # before training (train/features.py init_feature_standardization); identity until then. An affine
        # reparameterization of the two projections (the function class is the paper's), which AdamW trains much
        # faster: the backbone's channels differ in mean and scale by orders of magnitude.
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("pos_embed"):
                nn.init.xavier_uniform_(p)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the standardization buffers existed load as identity (their function unchanged).
        for name, fill in (("feature_mean", 0.0), ("feature_std", 1.0)):
            if prefix + "output_proj.weight" in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.full_like(getattr(self, name), fill)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, HW, C) original feature tokens -> (B, HW, C) reconstructed tokens."""
        pos = self.pos_embed().unsqueeze(0)  # (1, HW, d)
        memory = self.input_proj((tokens - self.feature_mean) / self.feature_std)  # (B, HW, d)
        for layer in self.encoder:
            memory = layer(memory, pos)
        tgt = self.query_embed.weight.unsqueeze(0).expand_as(memory)  # (B, HW, d): the auxiliary query
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos)
        return self.output_proj(self.decoder_norm(tgt)) * self.feature_std + self.feature_mean


# cfg.input_norm "image": an image's channel std is floored at this fraction of the reference's.
INPUT_STD_FLOOR = 0.1


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    return (k[:, None] * k[None, :])[None, None]  # (1, 1, K, K)


def whitening(cov: torch.Tensor, shrink: float) -> torch.Tensor:
    """(C, C) covariance -> the symmetric (cov + shrink * mean variance * I)^(-1/2), float64: multiplying a centred
    vector by it gives the Mahalanobis norm's coordinates. The shrinkage keeps directions the data never varies in from
    dominating."""
    cov = cov.double()
    cov = (cov + cov.T) / 2 + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(float(evals.max()) * 1e-12)  # only for a degenerate fit (all-zero residuals)
    return (evecs * evals.rsqrt()) @ evecs.T


def token_rings(grid: tuple[int, int], rings: int) -> torch.Tensor:
    """(h, w) ring index of each token: its distance to the nearest edge of the grid, capped at `rings` (the interior)."""
    h, w = grid
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    return torch.minimum(torch.minimum(i, h - 1 - i), torch.minimum(j, w - 1 - j)).clamp(max=rings)


def area_kernels(cfg: ADTRConfig) -> dict[int, tuple[int, int]]:
    """Stage -> the (kh, kw) average-pooling window that takes it to the token grid, for cfg.resize == "area".

    Static ints from the configuration (never from tensor shapes, so every exporter sees constants): stage s has stride
    2**s and, with TF-"same" padding, ceil(H / 2**s) rows. A stage finer than the grid whose size the grid divides is
    averaged; any other stage is resampled bilinearly, as in the paper.
    """
    if cfg.resize != "area":
        return {}
    kernels = {}
    for s in cfg.stages:
        size = [-(-n // 2**s) for n in cfg.input_size]
        if all(n > g and n % g == 0 for n, g in zip(size, cfg.grid)):
            kernels[s] = (size[0] // cfg.grid[0], size[1] // cfg.grid[1])
    return kernels


class ADTR(nn.Module):
    """The ADTR reference module. `forward` is the exported inference graph; training feeds its losses from
    `forward_features` (frozen, without gradients) and `reconstruct`."""

    def __init__(self, cfg: ADTRConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_efficientnet(
            cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, image_size=cfg.input_size, padding=cfg.padding
        )
        self.channels = sum(self.backbone.stage_channels(cfg.stages))
        self.backbone.truncate(max(cfg.stages))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self.transformer = ReconstructionTransformer(cfg, self.channels)
        # Normalization inside the graph: uint8 pixels -> (x / 255 - mean) / std == x * a + b.
        mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)
        if cfg.input_norm == "image":  # reference statistics in pixel units; ImageNet's until fit_input_reference
            self.register_buffer("input_ref_mean", mean.flatten() * 255.0)
            self.register_buffer("input_ref_std", std.flatten() * 255.0)
        else:
            self.input_ref_mean = self.input_ref_std = None
        self.area_kernels = area_kernels(cfg)
        if cfg.error_metric == "mahalanobis":  # identity until fit_error_metric: the plain L2 error
            self.register_buffer("error_mean", torch.zeros(self.channels))
            self.register_buffer("error_whiten", torch.eye(self.channels))
        else:
            self.error_mean = self.error_whiten = None
        if cfg.border_rings > 0:  # identity until fit_error_metric
            self.register_buffer("error_gain", torch.ones(1, 1, *cfg.grid))
            self.register_buffer("error_offset", torch.zeros(1, 1, *cfg.grid))
        else:
            self.error_gain = self.error_offset = None
        if cfg.blur_sigma > 0:
            self.register_buffer("blur_kernel", gaussian_kernel(cfg.blur_sigma), persistent=False)
        else:
            self.blur_kernel = None

    def train(self, mode: bool = True) -> ADTR:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics never move
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> multi-scale backbone features on the stride-16 grid (N, C, h, w)."""
        # Cast first, then permute: exported graphs then read the uint8 input with one Cast and nothing else (TensorRT
        # takes uint8 only as a network input cast straight away).
        x = images.to(torch.float32).permute(0, 3, 1, 2)  # (N, 3, H, W)
        if self.input_ref_mean is not None:
            x = self.standardize_input(x)
        x = x * self.pixel_scale + self.pixel_shift
        feats = self.backbone.forward_stages(x, self.cfg.stages)
        return torch.cat([self._to_grid(self._aggregate(f), s) for f, s in zip(feats, self.cfg.stages)], dim=1)

    def standardize_input(self, x: torch.Tensor) -> torch.Tensor:
        """cfg.input_norm "image": float (N, 3, H, W) pixels with each image's per-channel mean and std mapped onto the
        reference's (input_ref_mean / input_ref_std): exact for any per-channel gain and offset (no clipping aside). The
        std is floored at INPUT_STD_FLOOR of the reference's, so a nearly flat image is not amplified into noise."""
        mean = x.mean(dim=(2, 3), keepdim=True)
        ref_mean = self.input_ref_mean.view(1, 3, 1, 1)
        ref_std = self.input_ref_std.view(1, 3, 1, 1)
        var = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True)
        std = torch.maximum(torch.sqrt(var), INPUT_STD_FLOOR * ref_std)
        return (x - mean) * (ref_std / std) + ref_mean

    @torch.no_grad()
    def set_input_reference(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """cfg.input_norm "image": the reference per-channel mean and std (3,) each, in pixel units (0..255)."""
        if self.input_ref_mean is None:
            raise ValueError(f"input_norm is {self.cfg.input_norm!r}; only 'image' has input reference statistics")
        self.input_ref_mean.copy_(mean.to(self.input_ref_mean))
        self.input_ref_std.copy_(std.to(self.input_ref_std))

    def _aggregate(self, f: torch.Tensor) -> torch.Tensor:
        """Each position sees its k x k neighbourhood at the stage's own resolution (PatchCore's local aggregation)."""
        k = self.cfg.aggregate
        if k == 1:
            return f
        zeros = self.cfg.aggregate_padding == "zeros"
        return F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=zeros)

    def _to_grid(self, f: torch.Tensor, stage: int) -> torch.Tensor:
        """One stage's (N, c, H', W') output on the token grid (N, c, h, w)."""
        kernel = self.area_kernels.get(stage)
        if kernel is not None:  # average each grid cell's pixels: sampling at the grid's points drops most of them
            return F.avg_pool2d(f, kernel)
        return F.interpolate(f, size=self.cfg.grid, mode="bilinear", align_corners=True)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) features -> (N, C, h, w) reconstruction by the transformer."""
        tokens = features.flatten(2).transpose(1, 2)  # (N, hw, C)
        rec = self.transformer(tokens)  # (N, hw, C)
        return rec.transpose(1, 2).unflatten(2, self.cfg.grid)  # (N, C, h, w)

    def token_errors(self, features: torch.Tensor, reconstruction: torch.Tensor, border: bool = True) -> torch.Tensor:
        """(N, C, h, w) features and reconstruction -> (N, 1, h, w) reconstruction error per token: the L2 norm of the
        residual, whitened first under cfg.error_metric "mahalanobis", then border-standardized (cfg.border_rings;
        `border=False` skips that, for fitting it)."""
        residual = features - reconstruction
        if self.error_whiten is not None:  # a 1x1 convolution: every exporter and TensorRT handle it natively
            residual = F.conv2d(residual - self.error_mean.view(1, -1, 1, 1), self.error_whiten[:, :, None, None])
        err = torch.sqrt(torch.sum(residual**2, dim=1, keepdim=True))
        if border and self.error_gain is not None:
            err = err * self.error_gain + self.error_offset
        return err

    @torch.no_grad()
    def set_border_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Border standardization (cfg.border_rings) from each ring's error mean and std on good images, (rings + 1,)
        each, ring 0 the outermost: ring r's errors are mapped onto the innermost ring's mean and std."""
        if self.error_gain is None:
            raise ValueError("border_rings is 0; there is no border standardization to set")
        ring = token_rings(self.cfg.grid, self.cfg.border_rings)
        ref = int(ring.max())
        gain = std[ref] / std.clamp(min=1e-12)
        offset = mean[ref] - mean * gain
        self.error_gain.copy_(gain[ring].view_as(self.error_gain).to(self.error_gain))
        self.error_offset.copy_(offset[ring].view_as(self.error_offset).to(self.error_offset))

    @torch.no_grad()
    def set_error_statistics(self, mean: torch.Tensor, cov: torch.Tensor, shrink: float | None = None) -> None:
        """Whitening for cfg.error_metric "mahalanobis" from the residual's per-channel mean (C,) and channel covariance
        (C, C) on good images (`whitening`, with cfg.error_shrink unless `shrink` is given: benchmarks sweep it)."""
        if self.error_whiten is None:
            raise ValueError(f"error_metric is {self.cfg.error_metric!r}; only 'mahalanobis' has error statistics")
        self.error_mean.copy_(mean.to(self.error_mean))
        self.error_whiten.copy_(
            whitening(cov, self.cfg.error_shrink if shrink is None else shrink).to(self.error_whiten)
        )

    def anomaly_outputs(
        self, features: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token reconstruction error -> map at input size (N, 1, H, W) and image score (N,)."""
        return self.map_and_score(self.token_errors(features, reconstruction))

    def map_and_score(self, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token scores (N, 1, h, w) -> map at input size (N, 1, H, W) and image score (N,): upsample, optional
        blur, max of the average-pooled map. Benchmarks score other per-token distances (kNN) through it too."""
        amap = F.interpolate(err, size=self.cfg.input_size, mode="bilinear", align_corners=True)  # (N, 1, H, W)
        if self.blur_kernel is not None:
            pad = self.blur_kernel.shape[-1] // 2
            amap = F.conv2d(F.pad(amap, (pad, pad, pad, pad), mode="replicate"), self.blur_kernel)
        # The k x k mean as a k x 1 mean of 1 x k means: the same sums in another order (scores agree to ~1e-7
        # relative), 2k additions per pixel instead of k*k. OpenVINO's CPU plugin spent 2.6 ms of a 16 ms INT8 inference
        # on one 16 x 16 window (docs/bench.md, "The score window, the exporter and the calibration").
        k = self.cfg.score_pool
        pooled = F.avg_pool2d(F.avg_pool2d(amap, (k, 1), stride=1), (1, k), stride=1)
        score = torch.amax(pooled, dim=(1, 2, 3))  # (N,)
        return amap, score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward_features(images)
        return self.anomaly_outputs(feats, self.reconstruct(feats))
