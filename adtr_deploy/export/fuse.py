"""Inference-only rewrite of the reconstruction transformer: the same function with fewer, larger matrix products.

Export (ONNX, .pt2) runs a copy of the trained model whose `transformer` is a `FusedTransformer` built from its weights.
What changes is only where the linear algebra is grouped; every rewrite is exact in real arithmetic:

- Positional embeddings are constants, so `(x + pos) @ W.T + b == x @ W.T + (pos @ W.T + b)`: the pos adds become
  per-token biases of the projections, and the query, key and value projections of a self-attention read the same
  tensor, so they become ONE product with a (d, 3d) weight (fused QKV).
- The cross-attention keys and values of every decoder layer read the same encoder memory: one product for all of them
  ((d, 2 d L) weight).
- The attention scale is folded into the query weights; the feature standardization into the input and output
  projections.
- The decoder starts from the learned auxiliary query, which does not depend on the image: the first decoder layer's
  self-attention block (and its cross-attention query) is computed once here and stored as a constant.

The rewrite assumes the reference's layer structure (post-norm encoder and decoder layers, `adtr_deploy/model/adtr.py`).
`fuse_model` checks the fused transformer against the original on random tokens and refuses (FusionError) if they
differ, so a change of the reference's structure can never slip through as a silently different export; exports then
fall back to the unfused graph with a note. Verification against the PyTorch reference stays exactly as strict.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# The fused transformer must match the original to this fraction of its output range on random tokens (float32
# rounding of re-associated sums is ~1e-6 of it; a structural mismatch is of order 1).
SELF_CHECK_TOLERANCE = 1e-4


class FusionError(RuntimeError):
    """The fused transformer does not compute what the original does (the reference's structure changed)."""


def _lin(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.weight.detach().double(), layer.bias.detach().double()


def _per_token(pos: torch.Tensor, layer: nn.Linear, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, per-token bias) of x -> layer(x + pos) * scale, in float64."""
    w, b = _lin(layer)
    return w * scale, (pos @ w.T + b) * scale


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.float().contiguous(), requires_grad=False)


class _LN(nn.Module):
    """A LayerNorm's affine parameters; the op itself stays F.layer_norm (one native LayerNormalization node)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias = _param(norm.weight.detach()), _param(norm.bias.detach())
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _FFN(nn.Module):
    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.w1, self.b1 = _param(ffn.linear1.weight.detach()), _param(ffn.linear1.bias.detach())
        self.w2, self.b2 = _param(ffn.linear2.weight.detach()), _param(ffn.linear2.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, L, d) -> (B, h, L, d/h)"""
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Scaled (already, in q) dot-product attention over heads and the output projection: (B, h, L, dh) -> (B, L, d)."""
    ctx = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    return F.linear(ctx.transpose(1, 2).flatten(2), *out)


class _SelfAttention(nn.Module):
    """self_attn(x + pos, x + pos, x) as one QKV product with per-token biases."""

    def __init__(self, attn: nn.Module, pos: torch.Tensor):
        super().__init__()
        self.h = attn.nhead
        wq, bq = _per_token(pos, attn.q_proj, attn.scale)
        wk, bk = _per_token(pos, attn.k_proj)
        wv, bv = _lin(attn.v_proj)
        self.w = _param(torch.cat([wq, wk, wv]))
        self.b = _param(torch.cat([bq, bk, bv.expand_as(bq)], dim=-1))  # (L, 3d)
        self.wo, self.bo = _param(attn.out_proj.weight.detach()), _param(attn.out_proj.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ self.w.T + self.b).chunk(3, dim=-1)
        return _attend(_heads(q, self.h), _heads(k, self.h), _heads(v, self.h), (self.wo, self.bo))


class _EncoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, pos: torch.Tensor):
        super().__init__()
        self.attn = _SelfAttention(layer.self_attn, pos)
        self.ffn = _FFN(layer.ffn)
        self.norm1, self.norm2 = _LN(layer.norm1), _LN(layer.norm2)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        src = self.norm1(src + self.attn(src))
        return self.norm2(src + self.ffn(src))


class _DecoderLayer(nn.Module):
    """Decoder layer whose cross-attention keys/values come precomputed (all layers' in one product)."""

    def __init__(self, layer: nn.Module, pos: torch.Tensor, first_tgt: torch.Tensor | None):
        super().__init__()
        cross = layer.cross_attn
        self.h = cross.nhead
        wq, bq = _per_token(pos, cross.q_proj, cross.scale)
        if first_tgt is None:  # an ordinary layer: its self-attention and cross-attention query are computed
            self.attn = _SelfAttention(layer.self_attn, pos)
            self.norm1 = _LN(layer.norm1)
            self.wq, self.bq = _param(wq), _param(bq)
        else:  # the first layer: its input is the constant auxiliary query, so both are constants
            self.attn = None
            self.register_buffer("tgt0", first_tgt.float().contiguous())  # (1, L, d)
            self.register_buffer("q0", _heads((first_tgt.double() @ wq.T + bq).float(), self.h).contiguous())
        self.wo, self.bo = _param(cross.out_proj.weight.detach()), _param(cross.out_proj.bias.detach())
        self.ffn = _FFN(layer.ffn)
        self.norm2, self.norm3 = _LN(layer.norm2), _LN(layer.norm3)

    def forward(self, tgt: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.attn is None:
            tgt, q = self.tgt0, self.q0
        else:
            tgt = self.norm1(tgt + self.attn(tgt))
            q = _heads(tgt @ self.wq.T + self.bq, self.h)
        tgt = self.norm2(tgt + _attend(q, k, v, (self.wo, self.bo)))  # (1 or B, L, d) + (B, L, d)
        return self.norm3(tgt + self.ffn(tgt))


class FusedTransformer(nn.Module):
    """Drop-in replacement of a trained ReconstructionTransformer for inference: (B, HW, C) -> (B, HW, C)."""

    def __init__(self, t: nn.Module, precompute_first: bool = True):
        """`precompute_first=False` keeps the first decoder layer's self-attention a run-time computation per image (as
        in the reference), for measuring what precomputing it gives (benchmarks/speed_levers.py)."""
        super().__init__()
        t = copy.deepcopy(t).eval().double()
        with torch.no_grad():
            pos = t.pos_embed()  # (L, d)
            mean, std = t.feature_mean, t.feature_std
            w, b = _lin(t.input_proj)
            self.w_in, self.b_in = _param(w / std), _param(b - (mean / std) @ w.T)
            self.encoder = nn.ModuleList(_EncoderLayer(layer, pos) for layer in t.encoder)
            first = t.query_embed.weight.unsqueeze(0)  # (1, L, d): the auxiliary query
            self.query = None if precompute_first else _param(first)
            if len(t.decoder) and precompute_first:
                dec0 = t.decoder[0]
                qk = first + pos
                first = dec0.norm1(first + dec0.self_attn(qk, qk, first))
            self.decoder = nn.ModuleList(
                _DecoderLayer(layer, pos, first if i == 0 and precompute_first else None)
                for i, layer in enumerate(t.decoder)
            )
            kv_w, kv_b = [], []
            for layer in t.decoder:  # every layer's cross-attention keys and values from the one memory
                wk, bk = _per_token(pos, layer.cross_attn.k_proj)
                wv, bv = _lin(layer.cross_attn.v_proj)
                kv_w += [wk, wv]
                kv_b += [bk, bv.expand_as(bk)]
            self.h = t.decoder[0].cross_attn.nhead if len(t.decoder) else 1
            self.w_kv = _param(torch.cat(kv_w)) if kv_w else None
            self.b_kv = _param(torch.cat(kv_b, dim=-1)) if kv_b else None
            self.norm = _LN(t.decoder_norm)
            w, b = _lin(t.output_proj)
            self.w_out, self.b_out = _param(w * std[:, None]), _param(b * std + mean)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = tokens @ self.w_in.T + self.b_in
        for layer in self.encoder:
            memory = layer(memory)
        if not len(self.decoder):
            return F.linear(self.norm(memory), self.w_out, self.b_out)
        kv = (memory @ self.w_kv.T + self.b_kv).chunk(2 * len(self.decoder), dim=-1)
        tgt = None if self.query is None else self.query.expand(tokens.shape[0], -1, -1)
        for i, layer in enumerate(self.decoder):
            tgt = layer(tgt, _heads(kv[2 * i], self.h), _heads(kv[2 * i + 1], self.h))
        return F.linear(self.norm(tgt), self.w_out, self.b_out)


def self_check(original: nn.Module, fused: nn.Module) -> float:
    """Largest |fused - original| over the original's output range on random feature-like tokens; raises FusionError."""
    g = torch.Generator().manual_seed(0)
    mean, std = original.feature_mean, original.feature_std
    tokens_per_image = original.pos_embed().shape[0]
    tokens = torch.randn(2, tokens_per_image, original.input_proj.in_features, generator=g) * std + mean
    with torch.no_grad():
        want, got = original.eval()(tokens), fused(tokens)
    rel = float((want - got).abs().max() / (want.max() - want.min()).clamp_min(1e-12))
    if not rel <= SELF_CHECK_TOLERANCE:
        raise FusionError(
            f"the fused transformer differs from the model's by {rel:.2e} of its output range (bound "
            f"{SELF_CHECK_TOLERANCE:g}): the model's transformer is not the structure fuse.py rewrites"
        )
    return rel


def fuse_model(model: nn.Module, precompute_first: bool = True) -> tuple[nn.Module, dict]:
    """A copy of an ADTR model for inference whose transformer is fused; (copy, details for model.json)."""
    fused = copy.copy(model)  # shallow: the backbone and buffers are shared, the module dict is not
    fused._modules = dict(model._modules)
    original = model.transformer
    try:
        fused.transformer = FusedTransformer(original, precompute_first)
        rel = self_check(original, fused.transformer)
    except FusionError:
        raise
    except Exception as exc:  # a transformer without the attributes the rewrite reads: another structure
        raise FusionError(
            f"the model's transformer is not the structure fuse.py rewrites ({type(exc).__name__}: {exc})"
        ) from None
    details = {
        "fused": True,
        "self_check_max_rel": rel,
        "rewrites": [
            "fused QKV per self-attention (pos as per-token bias)",
            "all decoder layers' cross-attention K/V in one product",
            "first decoder layer's self-attention and cross-attention query precomputed (input-independent)",
            "attention scale and feature standardization folded into weights",
        ],
    }
    return fused.eval().requires_grad_(False), details
