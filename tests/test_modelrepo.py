"""The versioned model folder (runtime/modelrepo.py): numbering, active version, revoke/restore, atomic publish."""

import json

import pytest

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.modelrepo import PROMOTION, ModelRepo, is_model_repo


def _export(tmp_path, name="exp"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx bytes " + name.encode())
    (folder / "model.json").write_text(json.dumps({"name": name}))
    return [folder / "model.onnx", folder / "model.json"]


def test_publish_numbers_versions_and_the_highest_live_one_is_active(tmp_path):
    repo = ModelRepo(tmp_path / "models" / "brick")
    assert repo.versions() == [] and repo.active() is None
    with pytest.raises(UserError, match="no version to run"):
        repo.require_active()
    assert repo.publish(_export(tmp_path, "a"), {"by": "t"}) == 1
    assert repo.publish(_export(tmp_path, "b"), {"by": "t"}) == 2
    assert is_model_repo(repo.path) and not is_model_repo(tmp_path / "a")
    assert repo.active() == 2 and repo.model_path(2).read_bytes() == b"onnx bytes b"
    assert json.loads((repo.folder(2) / PROMOTION).read_text())["version"] == 2
    assert not [p for p in repo.path.iterdir() if p.name.startswith(".incoming")]

    mark = repo.revoke(2, "op", "false alarms")
    assert repo.active() == 1 and repo.revoked(2)["why"] == "false alarms" and mark["by"] == "op"
    # numbers are never reused: the next version is 3, not 2
    assert repo.publish(_export(tmp_path, "c"), {}) == 3 and repo.active() == 3
    repo.revoke(3, "op", "x")
    repo.restore(2)
    assert repo.active() == 2 and repo.live_versions() == [1, 2]
    with pytest.raises(UserError, match="no version 9"):
        repo.revoke(9, "op", "x")


def test_a_failed_copy_leaves_no_version(tmp_path):
    repo = ModelRepo(tmp_path / "m")
    files = _export(tmp_path)
    with pytest.raises(FileNotFoundError):
        repo.publish([*files, tmp_path / "missing.bin"], {})
    assert repo.versions() == [] and list(repo.path.iterdir()) == [repo.path / ".lock"]


def test_a_folder_with_a_model_of_its_own_is_not_a_repo(tmp_path):
    _export(tmp_path, "plain")
    with pytest.raises(UserError, match="holds a model file itself"):
        ModelRepo(tmp_path / "plain")
