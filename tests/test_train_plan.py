"""Which configuration a run uses (train/plan.py): new, fine-tuning (--init-from) or resumed, and the options refused."""

from __future__ import annotations

import pytest
import torch

from adtr_deploy.errors import UserError
from adtr_deploy.model.adtr import ADTR
from adtr_deploy.model.checkpoint import save_checkpoint
from adtr_deploy.model.config import get_preset
from adtr_deploy.train.config import TrainConfig
from adtr_deploy.train.plan import PlusSources, check_options, new_run, resumed_run


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A run folder whose checkpoint records an ADTR+ run of category 'tex' at 64x96 pixels, 7 epochs."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = ADTR(get_preset("tiny", input_size=(64, 96)))
    info = {
        "data": {"kind": "mvtec", "root": "/data", "category": "tex"},
        "train": TrainConfig(epochs=7, lr=3e-4, mode="adtr+", topk=5).to_dict(),
        "adtr_plus": {"synthetic": ["cutpaste"], "anomalies": None, "external": "cifar100:/c", "init_from": "/a.pt"},
    }
    save_checkpoint(out / "checkpoint.pt", model, mode="adtr+", info=info)
    return out


def test_options_that_would_be_ignored_are_refused():
    with pytest.raises(UserError, match="--topk only applies to ADTR\\+"):
        check_options("adtr", {"topk", "lr"}, resume=False, init_from=None)
    with pytest.raises(UserError, match="--input-size shapes a new model"):
        check_options("adtr", {"input_size"}, resume=True, init_from=None)
    with pytest.raises(UserError, match="--stages shapes a new model"):
        check_options("adtr+", {"stages", "topk"}, resume=False, init_from="runs/a")
    check_options("adtr+", {"topk", "stages", "input_size"}, resume=False, init_from=None)  # a new ADTR+ model


def test_a_resumed_run_keeps_its_stored_options_model_category_and_anomaly_sources(stored_run):
    plan = resumed_run(stored_run, {"epochs": 9, "device": "cpu", "workers": 2}, None)
    assert plan.train == TrainConfig(epochs=9, lr=3e-4, mode="adtr+", topk=5, workers=2)  # given again: takes effect
    assert plan.model.input_size == (64, 96) and plan.category == "tex"
    assert plan.plus == PlusSources(synthetic="cutpaste", anomalies=None, external="cifar100:/c")
    assert plan.init_from == "/a.pt"  # recorded again in the new checkpoint, not loaded again
    assert resumed_run(stored_run, {}, "other").category == "other"


def test_a_new_run_refuses_an_existing_run_and_fine_tuning_takes_the_checkpoints_model(stored_run, tmp_path):
    cfg = TrainConfig(epochs=2)
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        new_run(stored_run, cfg, "tex")
    assert new_run(stored_run, cfg, "tex", overwrite=True, preset="tiny").model == get_preset("tiny")
    plan = new_run(tmp_path, cfg, "tex", init_from=str(stored_run), preset="lite0")  # a run folder: its checkpoint
    assert plan.init_from == str((stored_run / "checkpoint.pt").resolve())
    assert plan.model.input_size == (64, 96) and plan.train == cfg and plan.plus == PlusSources()
