"""The package's shape, read statically from its source: dependency directions, module sizes, and the module map of
docs/architecture.md kept in step with the tree.

Intended directions (docs/architecture.md, "Packages and the one direction of imports"): the runtime imports only the
core and inference engines, never model/, train/, data/ or export/; the core (the package's top-level modules: spec,
preprocess, metrics, fileio, ...) imports nothing heavy and no sub-package; model/ knows nothing of training, export or
the CLI; export never imports data/ (its images come from the user or the checkpoint). Every import counts, also one
inside a function (a lazy import is still a dependency, it only moves the failure to run time), one through
importlib.import_module("...") and one named by a string such as the formats table's "module:function".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adtr_deploy"
ARCHITECTURE_PAGE = PACKAGE.parent / "docs" / "architecture.md"
MAX_LINES = 400
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "tensorrt")
SUB_PACKAGES = tuple(sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))

# the importing part -> the parts of the package it must not import
FORBIDDEN_PARTS: dict[str, tuple[str, ...]] = {
    "runtime": ("model", "train", "data", "export", "cli", "bench"),
    "core": SUB_PACKAGES,
    "model": ("train", "export", "cli", "bench"),
    "export": ("data", "train", "cli", "bench"),
}
# the importing part -> third-party packages it must not import
FORBIDDEN_LIBS: dict[str, tuple[str, ...]] = {"core": HEAVY}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {".".join(p.relative_to(package.parent).with_suffix("").parts): p for p in sorted(package.rglob("*.py"))}


def _part(module: str) -> str:
    """adtr_deploy.runtime.backends -> runtime; a top-level module (adtr_deploy.spec) or the package itself -> core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUB_PACKAGES) else "core"


# "adtr_deploy.export.onnx" or "adtr_deploy.export.onnx:export_onnx": a string naming a module of the package
MODULE_STRING = re.compile(r"adtr_deploy(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?")
DYNAMIC_IMPORTS = ("import_module", "__import__")


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth; relative imports resolved; also
    importlib.import_module("name") / __import__("name") with a constant name, and every string constant that names a
    module of the package (a registry's "module:function", a lazy-import table)."""
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
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            found.append((node.lineno, node.value.partition(":")[0]))
    return list(dict.fromkeys(found))  # import_module("adtr_deploy.x") is both a call and a module string


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


def test_the_direction_check_sees_export_to_data_through_importlib_and_module_strings(tmp_path):
    fake = tmp_path / "adtr_deploy"
    files = {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/demo.py": "",
        "export/__init__.py": "",
        "export/images.py": "def f():\n    from adtr_deploy.data.demo import make_sample\n",
        "export/lazy.py": "import importlib\nm = importlib.import_module('adtr_deploy.data.demo')\n",
        "export/plain.py": 'from importlib import import_module\nm = import_module("adtr_deploy.data")\n',
        "export/formats.py": "FORMATS = {'x': {'exporter': 'adtr_deploy.data.demo:write'}}\n",
        "export/fine.py": "FORMATS = {'x': {'exporter': 'adtr_deploy.export.images:f'}}\nDOC = 'see adtr_deploy.data'\n",
        "runtime/__init__.py": "",
        "runtime/trt.py": "import importlib\ndef f():\n    return importlib.import_module('adtr_deploy.export.x')\n",
    }
    for name, text in files.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    bad = sorted(_violations(fake))
    assert bad == [
        "adtr_deploy/export/formats.py:1 imports adtr_deploy.data.demo (export -> data)",
        "adtr_deploy/export/images.py:2 imports adtr_deploy.data.demo (export -> data)",
        "adtr_deploy/export/lazy.py:2 imports adtr_deploy.data.demo (export -> data)",
        "adtr_deploy/export/plain.py:2 imports adtr_deploy.data (export -> data)",
        "adtr_deploy/runtime/trt.py:3 imports adtr_deploy.export.x (runtime -> export)",
    ], bad
    real = _modules()
    formats = _imports("adtr_deploy.export.formats", real["adtr_deploy.export.formats"])
    assert any(name == "adtr_deploy.export.onnx" for _, name in formats)  # the table's "module:function" strings
    engine = _imports("adtr_deploy.runtime.engine_check", real["adtr_deploy.runtime.engine_check"])
    assert any(name == "tensorrt" for _, name in engine)  # importlib.import_module("tensorrt")


def test_no_module_imports_against_the_intended_direction():
    bad = _violations()
    assert not bad, "imports against the intended direction:\n" + "\n".join(bad)


def _long_modules() -> list[str]:
    lengths = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    return sorted(f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p, n in lengths.items() if n > MAX_LINES)


def test_no_module_is_longer_than_400_lines():
    long = _long_modules()
    assert not long, f"modules over {MAX_LINES} lines (split them where the steps are):\n" + "\n".join(long)


def test_image_selection_leak_guard_and_engine_check_run_without_torch(tmp_path):
    import subprocess
    import sys

    import cv2
    import numpy as np

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(folder / f"{i}.png"), np.random.default_rng(i).integers(0, 256, (40, 40, 3), np.uint8))

    code = (
        "import sys\n"
        "from adtr_deploy.export.images import verification_images\n"
        "import adtr_deploy.leak_guard, adtr_deploy.runtime.engine_check\n"
        f"batch, source = verification_images((32, 32), verify_images={str(folder)!r}, max_images=2)\n"
        "assert batch.shape == (2, 32, 32, 3) and 'images from' in source, source\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'tensorrt')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _page_modules(page: Path = ARCHITECTURE_PAGE) -> set[str]:
    """The modules the page's module map names: `x.py` / `sub/x.py` (a module) and `sub/` (a package), relative to
    adtr_deploy/, in backticks at the start of a list item."""
    text = page.read_text()
    section = text[text.index("## Module map") :]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    return set(re.findall(r"^- `([\w/]+(?:\.py|/))`", section, flags=re.M))


def _tree_modules(package: Path = PACKAGE) -> set[str]:
    """adtr_deploy's modules as the page names them: a package by its folder (sub/), any other file by its path."""
    names = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        names.add(rel[: -len("__init__.py")] if path.name == "__init__.py" and path.parent != package else rel)
    return names


def test_the_architecture_page_names_every_module_and_only_modules_that_exist():
    named, present = _page_modules(), _tree_modules()
    assert len(named) > 50 and "runtime/serve/" in named and "spec.py" in named  # the map was found and parsed
    missing = sorted(present - named)
    stale = sorted(named - present)
    assert not missing and not stale, (
        "docs/architecture.md's module map is out of step with adtr_deploy/: "
        + (f"add a line for {', '.join(missing)}" if missing else "")
        + ("; " if missing and stale else "")
        + (f"remove or fix {', '.join(stale)} (no such module)" if stale else "")
    )


def test_the_module_map_check_names_what_is_missing_and_what_is_stale(tmp_path):
    fake = tmp_path / "adtr_deploy"
    for name in ("__init__.py", "spec.py", "runtime/__init__.py", "runtime/new.py"):
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text("")
    page = tmp_path / "architecture.md"
    page.write_text(
        "# x\n\n## Module map\n\n- `__init__.py`: v\n- `spec.py`: s\n- `runtime/`: r\n- `gone.py`: g\n\n## After\n- `after.py`: not in the map\n"
    )
    assert _page_modules(page) == {"__init__.py", "spec.py", "runtime/", "gone.py"}
    assert _tree_modules(fake) - _page_modules(page) == {"runtime/new.py"}
    assert _page_modules(page) - _tree_modules(fake) == {"gone.py"}
