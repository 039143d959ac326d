"""The base package and the runtime run on Python 3.10 (NVIDIA JetPack 6's Python): checked statically with vermin.

vermin reads the code and reports the oldest Python every construct and standard-library name needs (`datetime.UTC`
needs 3.11, `except*` 3.11, `typing.Self` 3.11, ...), so the check holds on whichever Python runs the suite. Ruff lints
with target-version py310 (pyproject.toml) as well.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINIMUM = "3.10"


def _vermin() -> list[str]:
    exe = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(exe).exists():
        pytest.skip("vermin is not installed (pip install 'adtr-deploy[dev]')")
    return [exe]


def test_the_whole_package_needs_no_newer_python_than_3_10():
    cmd = [*_vermin(), "--no-tips", "--violations", "--eval-annotations", f"-t={MINIMUM}-", str(ROOT / "adtr_deploy")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_check_catches_a_3_11_construct(tmp_path):
    """The check itself can fail: the construct issue 14 found (`from datetime import UTC`) is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from datetime import UTC\n")
    res = subprocess.run(
        [*_vermin(), "--no-tips", "--violations", f"-t={MINIMUM}-", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "datetime.UTC" in res.stdout


def test_ruff_lints_for_python_3_10():
    """CI lints too, with ruff's target set to 3.10 (pyproject.toml), so its pyupgrade rules never suggest newer syntax."""
    assert 'target-version = "py310"' in (ROOT / "pyproject.toml").read_text()
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (pip install 'adtr-deploy[dev]')")
    res = subprocess.run([exe, "check", "adtr_deploy", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
