"""The ADTR model and its backbones: real weights, parameter layout, shapes, frozen backbone, traceable/exportable forward."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from adtr_deploy.model import ADTR, get_preset
from adtr_deploy.model.efficientnet import EfficientNet, WeightsError, build_efficientnet, load_weights, same_padding
from adtr_deploy.preprocess import resize
from tests.conftest import texture_images


def _imagenet_input(img: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(resize(img, (224, 224))).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.e2e
def test_lite0_real_weights_classify_chelsea_and_coffee():
    from skimage import data

    model = build_efficientnet("efficientnet-lite0", pretrained=True)
    with torch.no_grad():
        cat = model(_imagenet_input(data.chelsea())).argmax(1).item()
        coffee = model(_imagenet_input(data.coffee())).argmax(1).item()
    assert cat == 285  # Egyptian cat
    assert coffee == 967  # espresso


@pytest.mark.e2e
def test_tf_same_padding_fits_the_weights_better_than_symmetric():
    """The Lite weights were trained in TensorFlow with 'SAME' padding: with it the correct classes get higher likelihood."""
    from skimage import data

    nll = {}
    for padding in ("same", "symmetric"):
        model = build_efficientnet("efficientnet-lite0", pretrained=True, padding=padding)
        with torch.no_grad():
            lp_cat = model(_imagenet_input(data.chelsea())).log_softmax(1)[0, 285]
            lp_coffee = model(_imagenet_input(data.coffee())).log_softmax(1)[0, 967]
        nll[padding] = -(lp_cat + lp_coffee).item()
    assert nll["same"] < nll["symmetric"]


def test_same_padding_is_asymmetric_like_tensorflow():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(14, 5, 1) == (2, 2)


def test_b4_has_the_efficientnet_pytorch_layout_and_parameter_count(tmp_path):
    model = EfficientNet("efficientnet-b4")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 19.34e6) < 0.05e6
    keys = model.state_dict().keys()
    for key in (
        "_conv_stem.weight",
        "_bn0.running_var",
        "_blocks.0._se_reduce.weight",
        "_blocks.31._project_conv.weight",
        "_conv_head.weight",
        "_fc.bias",
    ):
        assert key in keys
    assert model.stage_channels([1, 2, 3, 4, 5]) == [24, 32, 56, 160, 448]  # 720 channels, as in the paper
    # A state dict in that layout loads strictly from a user-given file.
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "efficientnet-b4.pth"
    torch.save(state, path)
    other = EfficientNet("efficientnet-b4")
    load_weights(other, str(path))
    assert torch.equal(other._blocks[5]._depthwise_conv.weight, state["_blocks.5._depthwise_conv.weight"])


def test_wrong_or_missing_backbone_weights_give_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(EfficientNet("efficientnet-b4"), str(tmp_path / "missing.pth"))
    path = tmp_path / "b0.pth"
    torch.save(EfficientNet("efficientnet-b0").state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit efficientnet-b4"):
        load_weights(EfficientNet("efficientnet-b4"), str(path))
    with pytest.raises(WeightsError, match="--weights"):
        build_efficientnet("efficientnet-b4", pretrained=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_shapes_and_dtypes(batch):
    model = ADTR(get_preset("tiny")).eval()
    x = torch.from_numpy(texture_images(batch, 64))
    with torch.no_grad():
        amap, score = model(x)
    assert amap.shape == (batch, 1, 64, 64) and amap.dtype == torch.float32
    assert score.shape == (batch,) and score.dtype == torch.float32
    assert torch.all(amap >= 0) and torch.all(score > 0)
    # The score is the max of the average-pooled map, so it lies between the map's mean and max.
    assert torch.all(score <= amap.flatten(1).max(1).values + 1e-6)


def test_paper_preset_matches_the_paper():
    cfg = get_preset("paper")
    assert cfg.backbone == "efficientnet-b4" and cfg.stages == (1, 2, 3, 4, 5) and cfg.input_size == (224, 224)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.nhead, cfg.d_model, cfg.dim_feedforward) == (
        4,
        4,
        8,
        256,
        1024,
    )
    assert cfg.grid == (14, 14)
    model = ADTR(cfg.replace(pretrained=False))
    assert model.channels == 720


def test_lite0_small_is_lite0_with_a_quarter_size_transformer():
    lite0, small = get_preset("lite0"), get_preset("lite0-small")
    assert small.replace(d_model=lite0.d_model, dim_feedforward=lite0.dim_feedforward) == lite0  # tokens, metric alike
    sizes = [
        sum(p.numel() for p in ADTR(cfg.replace(pretrained=False)).transformer.parameters()) for cfg in (lite0, small)
    ]
    assert sizes[1] < 0.3 * sizes[0]


def test_accurate_is_lite0_at_320_px():
    lite0, accurate = get_preset("lite0"), get_preset("accurate")
    assert accurate.replace(input_size=lite0.input_size) == lite0 and accurate.grid == (20, 20)


def test_backbone_is_frozen_and_stays_in_eval_mode():
    model = ADTR(get_preset("tiny"))
    model.train()
    assert not model.backbone.training
    x = torch.from_numpy(texture_images(2, 64))
    feats = model.forward_features(x)  # no torch.no_grad here: freezing alone must keep the backbone's grads empty
    rec = model.reconstruct(feats)
    torch.nn.functional.mse_loss(rec, feats).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.transformer.parameters() if p.requires_grad)


def test_chosen_stages_set_the_channel_count():
    cfg = get_preset("tiny-lite0")
    assert ADTR(cfg.replace(stages=(4, 5), pretrained=False)).channels == 112 + 320
    assert ADTR(cfg.replace(pretrained=False)).channels == 16 + 24 + 40 + 112  # the default tokens: stages 1-4
    assert ADTR(get_preset("lite0-classic", pretrained=False)).channels == 16 + 24 + 40 + 112 + 320


def test_area_tokens_average_each_grid_cell_and_coarser_stages_are_upsampled():
    """resize="area": a finer stage's token is the mean of its grid cell (not a sample of it); stage 4 is the grid."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", input_size=(64, 64), aggregate=1)  # grid 4x4; stages 1-4 at 32, 16, 8, 4 pixels
    model = ADTR(cfg).eval()
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        feats = model.forward_features(x)
        xn = x.permute(0, 3, 1, 2).float() * model.pixel_scale + model.pixel_shift
        stages = model.backbone.forward_stages(xn, cfg.stages)
    expected = []
    for f in stages:  # by hand: mean over each (H/4) x (W/4) cell
        n, c, h, w = f.shape
        expected.append(f.reshape(n, c, 4, h // 4, 4, w // 4).mean(dim=(3, 5)))
    assert torch.allclose(feats, torch.cat(expected, dim=1), atol=1e-5)
    bilinear = ADTR(cfg.replace(resize="bilinear"))
    bilinear.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(bilinear.eval().forward_features(x), feats, atol=1e-3)


def test_zero_padded_aggregation_averages_each_neighbourhood_counting_the_padding():
    """aggregate=3: each stage position becomes the mean of its 3x3 neighbourhood; with aggregate_padding "zeros" the
    positions outside the image count as zeros (border features shrink), with "inside" they are left out."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", aggregate=3, aggregate_padding="zeros")
    zeros, inside = ADTR(cfg).eval(), ADTR(cfg.replace(aggregate_padding="inside")).eval()
    f = torch.rand(1, 2, 5, 5) + 1.0
    by_hand = torch.nn.functional.pad(f, (1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1).sum(dim=(-1, -2)) / 9
    torch.testing.assert_close(zeros._aggregate(f), by_hand)
    assert torch.allclose(inside._aggregate(f)[..., 1:-1, 1:-1], by_hand[..., 1:-1, 1:-1])
    torch.testing.assert_close(inside._aggregate(f)[..., 0, 0], f[..., :2, :2].mean(dim=(-1, -2)))
    with pytest.raises(Exception, match="aggregate_padding"):
        cfg.replace(aggregate_padding="reflect")


def test_border_standardization_maps_each_rings_error_onto_the_interiors():
    from adtr_deploy.model.adtr import token_rings
    from adtr_deploy.train.config import TrainConfig
    from adtr_deploy.train.features import TrainingSet, fit_error_metric

    assert token_rings((5, 6), 3).tolist() == [
        [0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 2, 2, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    torch.manual_seed(0)
    model = ADTR(get_preset("tiny", input_size=(128, 128), border_rings=3)).eval()  # 8x8 grid: rings 0-2, interior
    x = torch.from_numpy(texture_images(6, 128))
    with torch.no_grad():
        feats = model.forward_features(x)
        raw = model.token_errors(feats, model.reconstruct(feats))  # not fitted yet: unchanged
        info = fit_error_metric(model, TrainingSet([], [], feats), TrainConfig(progress=False), torch.device("cpu"))
        fitted = model.token_errors(feats, model.reconstruct(feats))
        unstandardized = model.token_errors(feats, model.reconstruct(feats), border=False)
    ring = token_rings(model.cfg.grid, 3)
    means = [float(fitted[..., ring == r].mean()) for r in range(4)]
    stds = [float(fitted[..., ring == r].std(unbiased=False)) for r in range(4)]
    raw_means = [float(unstandardized[..., ring == r].mean()) for r in range(4)]
    assert info["border_rings"] == 3 and len(info["ring_mean"]) == 4
    np.testing.assert_allclose(info["ring_mean"], raw_means, rtol=1e-3)
    np.testing.assert_allclose(means, means[3], rtol=1e-4)  # every ring now has the interior's mean and std
    np.testing.assert_allclose(stds, stds[3], rtol=1e-3)
    assert max(raw_means) - min(raw_means) > 0.01 * raw_means[3]  # it had something to do
    assert torch.equal(fitted[..., ring == 3], unstandardized[..., ring == 3])  # the interior is untouched
    assert not torch.equal(raw, fitted)
    # the paper's model keeps no border statistics
    paper_like = ADTR(get_preset("tiny", border_rings=0))
    assert "error_gain" not in paper_like.state_dict() and get_preset("paper").border_rings == 0
    with pytest.raises(ValueError, match="border_rings is 0"):
        paper_like.set_border_statistics(torch.ones(4), torch.ones(4))


def _upsample_align_corners(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (N, h, w) with align_corners=True, written out with np.interp (rows, then columns)."""
    n, h, w = grid.shape
    ys, xs = np.linspace(0, h - 1, size[0]), np.linspace(0, w - 1, size[1])
    rows = np.empty((n, size[0], w))
    out = np.empty((n, size[0], size[1]))
    for i in range(n):
        for j in range(w):
            rows[i, :, j] = np.interp(ys, np.arange(h), grid[i, :, j])
        for y in range(size[0]):
            out[i, y] = np.interp(xs, np.arange(w), rows[i, y])
    return out


def test_reconstruction_error_is_the_anomaly_map():
    torch.manual_seed(0)
    model = ADTR(get_preset("tiny")).eval()
    x = torch.from_numpy(texture_images(2, 64))
    with torch.no_grad():
        feats = model.forward_features(x)  # (N, C, h, w)
        rec = model.reconstruct(feats)
        amap, score = model(x)
        perfect, _ = model.anomaly_outputs(feats, feats)
    assert perfect.abs().max() == 0  # a perfect reconstruction has no anomaly
    # by hand: L2 over channels of (features - reconstruction) per grid cell, upsampled bilinearly to the input size
    err = np.sqrt(((feats.double().numpy() - rec.double().numpy()) ** 2).sum(axis=1))  # (N, h, w)
    expected = _upsample_align_corners(err, model.cfg.input_size)  # (N, H, W)
    assert expected.min() > 0 and expected.std() > 0  # a real map: not constant, not zero
    np.testing.assert_allclose(amap[:, 0].numpy(), expected, rtol=1e-4, atol=1e-5 * expected.max())
    # the image score: the maximum of the map averaged over score_pool x score_pool windows
    k = model.cfg.score_pool
    windows = np.lib.stride_tricks.sliding_window_view(expected, (k, k), axis=(1, 2))
    np.testing.assert_allclose(score.numpy(), windows.mean(axis=(-1, -2)).max(axis=(1, 2)), rtol=1e-4)


def test_mahalanobis_error_is_the_residuals_norm_under_its_shrunk_covariance():
    torch.manual_seed(0)
    model = ADTR(get_preset("tiny")).eval()
    assert model.cfg.error_metric == "mahalanobis"
    x = torch.from_numpy(texture_images(2, 64))
    with torch.no_grad():
        feats = model.forward_features(x)
        rec = model.reconstruct(feats)
        plain = model.token_errors(feats, rec)  # not fitted yet: identity whitening, the L2 error
        np.testing.assert_allclose(plain.numpy(), torch.linalg.vector_norm(feats - rec, dim=1, keepdim=True), rtol=1e-5)
        c = model.channels
        g = torch.Generator().manual_seed(1)
        a = torch.randn(c, c, generator=g, dtype=torch.float64)
        cov = a @ a.T / c + torch.diag(torch.rand(c, generator=g, dtype=torch.float64))  # correlated channels
        mean = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
        model.set_error_statistics(mean, cov)
        got = model.token_errors(feats, rec)[:, 0].double()
        amap, _ = model(x)
    # by hand: sqrt((r - mean)^T (cov + shrink * mean variance * I)^(-1) (r - mean)) per token
    r = (feats - rec).double().permute(0, 2, 3, 1) - mean  # (N, h, w, C)
    shrunk = cov + model.cfg.error_shrink * cov.diagonal().mean() * torch.eye(c, dtype=torch.float64)
    want = torch.einsum("nhwc,nhwc->nhw", r, torch.linalg.solve(shrunk, r.reshape(-1, c).T).T.reshape(r.shape)).sqrt()
    assert want.std() > 0
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4)
    assert np.abs(got.numpy() / plain[:, 0].double().numpy() - 1).max() > 0.05  # the metric does change the map
    assert amap.shape == (2, 1, 64, 64)
    # the paper's L2 keeps no statistics at all
    assert "error_whiten" not in ADTR(get_preset("tiny", error_metric="l2")).state_dict()
    with pytest.raises(ValueError, match="only 'mahalanobis'"):
        ADTR(get_preset("tiny", error_metric="l2")).set_error_statistics(mean, cov)


def test_the_score_is_the_largest_window_mean_of_the_map_for_any_window_and_input_shape():
    """The score's k x k mean is computed as two 1-D means (docs/bench.md, "The score window"): the same value."""
    rng = np.random.default_rng(0)
    for size, k in (((64, 64), 16), ((48, 80), 5), ((32, 40), 1)):
        model = ADTR(get_preset("tiny").replace(input_size=size, score_pool=k)).eval()
        err = torch.from_numpy(rng.gamma(2.0, 1.0, size=(3, 1, 7, 9)).astype(np.float32))
        with torch.no_grad():
            amap, score = model.map_and_score(err)
        windows = np.lib.stride_tricks.sliding_window_view(amap[:, 0].double().numpy(), (k, k), axis=(1, 2))
        np.testing.assert_allclose(score.numpy(), windows.mean(axis=(-1, -2)).max(axis=(1, 2)), rtol=1e-6)


def test_gaussian_blur_option_smooths_the_map():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    plain = ADTR(cfg).eval()
    blurred = ADTR(cfg.replace(blur_sigma=2.0)).eval()
    blurred.load_state_dict(plain.state_dict())
    x = torch.from_numpy(texture_images(2, 64))
    with torch.no_grad():
        a, _ = plain(x)
        b, _ = blurred(x)
    assert b.diff(dim=-1).abs().mean() < a.diff(dim=-1).abs().mean()


def test_reference_traces_to_torchscript_with_any_batch():
    model = ADTR(get_preset("tiny")).eval()
    traced = torch.jit.trace(model, torch.from_numpy(texture_images(2, 64)))
    x = torch.from_numpy(texture_images(5, 64, seed=1))
    with torch.no_grad():
        ref, got = model(x), traced(x)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_reference_exports_to_onnx_with_a_dynamic_batch_axis(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = ADTR(get_preset("tiny")).eval()
    path = tmp_path / "m.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        model,
        (torch.from_numpy(texture_images(2, 64)),),
        str(path),
        input_names=["image"],
        output_names=["anomaly_map", "score"],
        dynamic_shapes={"images": {0: batch}},
        opset_version=18,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 4):
        x = texture_images(n, 64, seed=n)
        amap, score = sess.run(None, {"image": x})
        with torch.no_grad():
            ref_map, ref_score = model(torch.from_numpy(x))
        np.testing.assert_allclose(amap, ref_map.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(score, ref_score.numpy(), rtol=1e-4, atol=1e-4)


def test_importing_the_package_imports_neither_torch_nor_onnxruntime():
    import subprocess

    code = "import sys, adtr_deploy, adtr_deploy.spec; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def _record_inputs(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, tuple], list]:
    """Forward pre-hooks that keep each module's positional inputs (the last call's) under its name."""
    seen: dict[str, tuple] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args))
        for name, m in modules.items()
    ]
    return seen, handles


def test_the_decoder_reads_the_auxiliary_query_not_the_image():
    torch.manual_seed(0)
    model = ADTR(get_preset("tiny")).eval()
    t = model.transformer
    seen, handles = _record_inputs({"decoder0": t.decoder[0]})
    images = [torch.from_numpy(texture_images(2, 64, seed=s)) for s in (1, 2)]
    inputs = []
    with torch.no_grad():
        for x in images:
            model(x)
            inputs.append(seen["decoder0"])
    for h in handles:
        h.remove()
    (tgt_a, memory_a, _), (tgt_b, memory_b, _) = inputs
    query = t.query_embed.weight.unsqueeze(0).expand_as(tgt_a)
    torch.testing.assert_close(tgt_a, query, rtol=0, atol=0)  # the first layer's queries are the learned table...
    torch.testing.assert_close(tgt_b, query, rtol=0, atol=0)  # ...whatever the image
    assert (memory_a - memory_b).abs().max() > 1e-3  # while the encoder memory does depend on the image


def test_the_position_embedding_goes_to_queries_and_keys_only():
    torch.manual_seed(0)
    model = ADTR(get_preset("tiny")).eval()
    t = model.transformer
    enc, dec = t.encoder[0], t.decoder[0]
    modules = {
        "enc": enc,
        "enc_attn": enc.self_attn,
        "dec": dec,
        "dec_self": dec.self_attn,
        "dec_cross": dec.cross_attn,
    }
    seen, handles = _record_inputs(modules)
    after_norm1: dict[str, torch.Tensor] = {}
    handles.append(dec.norm1.register_forward_hook(lambda _m, _a, out: after_norm1.__setitem__("tgt", out)))
    with torch.no_grad():
        model(torch.from_numpy(texture_images(2, 64, seed=4)))
    for h in handles:
        h.remove()
    pos = t.pos_embed().unsqueeze(0)
    assert pos.abs().max() > 0.1  # a real embedding, so adding it or not is visible

    src, _ = seen["enc"]
    tgt, memory, _ = seen["dec"]
    expected = {  # (query, key, value) of each attention
        "enc_attn": (src + pos, src + pos, src),
        "dec_self": (tgt + pos, tgt + pos, tgt),
        "dec_cross": (after_norm1["tgt"] + pos, memory + pos, memory),
    }
    for name, want in expected.items():
        for role, got, w in zip("qkv", seen[name], want):
            assert torch.allclose(got, w.expand_as(got), rtol=0, atol=1e-6), f"{name}: {role} is not as expected"
