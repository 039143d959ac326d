"""The fused inference rewrite of the transformer (export/fuse.py): the same function, refused when it is not."""

from __future__ import annotations

import pytest
import torch

from adtr_deploy.export.formats import ExportOptions
from adtr_deploy.export.fuse import FusedTransformer, FusionError, fuse_model
from adtr_deploy.export.onnx import fused_for_export
from adtr_deploy.model import ADTR, get_preset
from adtr_deploy.model import adtr as adtr_module


@pytest.fixture(scope="module")
def model() -> ADTR:
    torch.manual_seed(3)
    m = ADTR(get_preset("tiny").replace(num_encoder_layers=2, num_decoder_layers=2)).eval()
    with torch.no_grad():  # a trained model's standardization is far from identity; fold it for real
        m.transformer.feature_mean.normal_(0.0, 2.0)
        m.transformer.feature_std.uniform_(0.2, 5.0)
        for p in m.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("precompute_first", [True, False])
def test_fused_model_computes_the_reference_map_and_score_at_batch_1_and_3(model, precompute_first):
    fused, details = fuse_model(model, precompute_first=precompute_first)
    assert isinstance(fused.transformer, FusedTransformer) and model.transformer is not fused.transformer
    assert details["fused"] and details["self_check_max_rel"] < 1e-5
    for n in (1, 3):
        images = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            (ref_map, ref_score), (amap, score) = model(images), fused(images)
        span = float(ref_map.max() - ref_map.min())
        assert span > 0 and float((amap - ref_map).abs().max()) <= 1e-5 * span
        assert float((score - ref_score).abs().max()) <= 1e-5 * span
    assert isinstance(model.transformer, adtr_module.ReconstructionTransformer)  # the original is untouched


def test_a_transformer_of_another_structure_is_refused_and_exported_unfused(model, monkeypatch):
    def pre_norm(self, src, pos):  # a pre-norm layer: same weights, another function
        qk = self.norm1(src) + pos
        src = src + self.self_attn(qk, qk, self.norm1(src))
        return src + self.ffn(self.norm2(src))

    monkeypatch.setattr(adtr_module.EncoderLayer, "forward", pre_norm)
    with pytest.raises(FusionError, match="not the structure fuse.py rewrites"):
        fuse_model(model)
    module, details, notes = fused_for_export(model, ExportOptions())
    assert module is model and details["fused"] is False and "exported unfused" in notes[0]
    assert fused_for_export(model, ExportOptions(fuse=False))[1] == {"fused": False, "reason": "--no-fuse"}
