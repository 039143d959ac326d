"""The pieces the benchmark studies share (adtr_deploy/bench/studies.py), and every benchmark script as an importable
module whose work starts in main(), not at import."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from adtr_deploy.bench import studies

torch = pytest.importorskip("torch")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _features(n: int, c: int = 6, h: int = 5, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, c, h, w)).astype(np.float32))


def test_nearest_training_distance_is_the_brute_force_minimum_over_every_training_token():
    f_train, f_test = _features(3), _features(2, seed=1)
    d = studies.nearest_training_distance(f_train, f_test)
    bank = f_train.permute(0, 2, 3, 1).reshape(-1, 6).double()
    for i, y, x in [(0, 0, 0), (1, 4, 2), (1, 2, 3)]:
        expected = (bank - f_test[i, :, y, x].double()).norm(dim=1).min()
        assert float(d[i, 0, y, x]) == pytest.approx(float(expected), rel=1e-5)
    assert float(studies.nearest_training_distance(f_train, f_train[:1]).max()) < 1e-2  # its own tokens (cdist rounds)


def test_gaussian_distance_is_the_mahalanobis_norm_under_the_models_whitening():
    from adtr_deploy.model.adtr import whitening

    f_train, f_test = _features(4), _features(1, seed=2)
    d = studies.gaussian_distance(f_train, f_test, shrink=0.01)
    x = f_train.permute(0, 2, 3, 1).reshape(-1, 6).double()
    cov = torch.cov(x.T, correction=0)
    v = f_test[0, :, 1, 1].double() - x.mean(0)
    shrunk = cov + 0.01 * cov.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    assert float(d[0, 0, 1, 1]) == pytest.approx(float(torch.sqrt(v @ torch.linalg.inv(shrunk) @ v)), rel=1e-4)
    assert float(d[0, 0, 1, 1]) == pytest.approx(float((v @ whitening(cov, 0.01)).norm()), rel=1e-5)


def test_standardize_by_ring_gives_each_ring_of_the_training_scores_zero_mean_and_unit_std():
    from adtr_deploy.model.adtr import token_rings

    d_train = torch.rand(8, 1, 7, 7) + torch.linspace(0, 3, 7).view(1, 1, 1, 7)  # a level that changes over the grid
    out = studies.standardize_by_ring(d_train, d_train, inner=3)
    ring = token_rings((7, 7), 3)
    for r in ring.unique():
        vals = out[..., ring == r]
        assert float(vals.mean()) == pytest.approx(0.0, abs=1e-5) and float(vals.std()) == pytest.approx(1.0, rel=1e-3)


def test_score_tokens_is_the_models_own_map_and_score():
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.config import get_preset

    model = ADTR(get_preset("tiny", blur_sigma=1.0)).eval()
    err = torch.rand(2, 1, *model.cfg.grid)
    amap, score = studies.score_tokens(model, err)
    ref_map, ref_score = model.map_and_score(err)
    np.testing.assert_array_equal(amap, ref_map[:, 0].detach().numpy())
    np.testing.assert_array_equal(score, ref_score.detach().numpy())


def test_write_result_writes_strict_json_and_the_table(tmp_path):
    out = tmp_path / "r.json"
    studies.write_result({"a": 1.5, "machine": studies.machine()}, out, lambda r: f"| a | {r['a']} |\n")
    assert json.loads(out.read_text())["a"] == 1.5 and out.with_suffix(".md").read_text() == "| a | 1.5 |\n"
    studies.write_result({"a": float("nan")}, tmp_path / "nan.json", str)  # strict JSON: NaN is written as null
    assert json.loads((tmp_path / "nan.json").read_text(), parse_constant=lambda c: 1 / 0) == {"a": None}
    assert studies.command_line("x.py", ["--data", "a b"]) == "python benchmarks/x.py --data 'a b'"
    assert (studies.pct(0.9234), studies.pct(None)) == ("92.3", "-")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_is_an_importable_module_with_main(script):
    """Importing a benchmark runs nothing (no work at import, no `from common import` that needs the folder on
    sys.path), and its work starts in main()."""
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert callable(getattr(module, "main", None)), f"benchmarks/{script} has no main()"
