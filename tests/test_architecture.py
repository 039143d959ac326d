"""The package's shape, read statically from its source: dependency directions, module sizes.

Intended directions (../DESIGN.md, "Where the code has grown"): the runtime imports only the core and inference
engines, never model/, train/, data/ or export/; the core (the package's top-level modules: spec, preprocess, metrics,
fileio, ...) imports nothing heavy and no sub-package; model/ knows nothing of training, export or the CLI. Every
import counts, also one inside a function: a lazy import is still a dependency, it only moves the failure to run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adtr_deploy"
MAX_LINES = 400
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "tensorrt")
SUB_PACKAGES = tuple(sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))

# the importing part -> the parts of the package it must not import
FORBIDDEN_PARTS: dict[str, tuple[str, ...]] = {
    "runtime": ("model", "train", "data", "export", "cli", "bench"),
    "core": SUB_PACKAGES,
    "model": ("train", "export", "cli", "bench"),
}
# the importing part -> third-party packages it must not import
FORBIDDEN_LIBS: dict[str, tuple[str, ...]] = {"core": HEAVY}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {".".join(p.relative_to(package.parent).with_suffix("").parts): p for p in sorted(package.rglob("*.py"))}


def _part(module: str) -> str:
    """adtr_deploy.runtime.backends -> runtime; a top-level module (adtr_deploy.spec) or the package itself -> core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUB_PACKAGES) else "core"


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth; relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from adtr_deploy import metrics` imports the module adtr_deploy.metrics
            found += [(node.lineno, f"{base}.{a.name}" if base == "adtr_deploy" else base) for a in node.names]
    return found


def _violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for module, path in _modules(package).items():
        part = _part(module)
        for line, name in _imports(module, path):
            where = f"{path.relative_to(package.parent)}:{line} imports {name}"
            if name.startswith("adtr_deploy.") and _part(name) in FORBIDDEN_PARTS.get(part, ()):
                bad.append(f"{where} ({part} -> {_part(name)})")
            if name.split(".")[0] in FORBIDDEN_LIBS.get(part, ()):
                bad.append(f"{where} ({part} -> {name.split('.')[0]})")
    return bad


def test_the_import_walk_sees_every_part_and_both_kinds_of_import():
    # guards the walk itself: if it found nothing, the direction test below would pass vacuously
    modules = _modules()
    assert {"runtime", "model", "export", "train", "data", "cli", "core"} <= {_part(m) for m in modules}
    lazy = _imports("adtr_deploy.runtime.backends", modules["adtr_deploy.runtime.backends"])
    assert any(name == "torch" for _, name in lazy)  # a function-level import (the TorchScript backend)
    assert any(name == "adtr_deploy.runtime.base" for _, name in lazy)
    assert (
        _part("adtr_deploy.spec") == "core" and _part("adtr_deploy") == "core" and _part("adtr_deploy.model") == "model"
    )


def test_the_direction_check_flags_lazy_relative_and_from_package_imports(tmp_path):
    fake = tmp_path / "adtr_deploy"
    files = {
        "__init__.py": "",
        "spec.py": "def f():\n    import torch\n",  # core -> heavy, lazily
        "runtime/__init__.py": "",
        "runtime/ok.py": "from adtr_deploy.spec import f\nimport numpy\n",
        "runtime/bad.py": "def g():\n    from ..export import tensorrt\n",  # runtime -> export, relative and lazy
        "model/__init__.py": "from adtr_deploy import train\n",  # model -> train through the package
        "export/__init__.py": "",
        "train/__init__.py": "",
    }
    for name, text in files.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    bad = _violations(fake)
    assert len(bad) == 3, bad
    assert any("spec.py:2 imports torch (core -> torch)" in b for b in bad)
    assert any("runtime/bad.py:2 imports adtr_deploy.export (runtime -> export)" in b for b in bad)
    assert any("model/__init__.py:1 imports adtr_deploy.train (model -> train)" in b for b in bad)


def test_no_module_imports_against_the_intended_direction():
    bad = _violations()
    assert not bad, "imports against the intended direction:\n" + "\n".join(bad)


def _long_modules() -> list[str]:
    lengths = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    return sorted(f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p, n in lengths.items() if n > MAX_LINES)


def test_no_module_is_longer_than_400_lines():
    long = _long_modules()
    assert not long, f"modules over {MAX_LINES} lines (split them where the steps are):\n" + "\n".join(long)


def test_image_selection_leak_guard_and_engine_check_run_without_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from adtr_deploy.export.images import verification_images\n"
        "import adtr_deploy.leak_guard, adtr_deploy.runtime.engine_check\n"
        "batch, source = verification_images((32, 32), max_images=2)\n"
        "assert batch.shape == (2, 32, 32, 3) and 'demo' in source, source\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'tensorrt')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
