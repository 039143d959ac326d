"""Runtime benchmark scenarios: export a model, then `adtr-bench` it against the PyTorch reference.

    python benchmarks/runtime_bench.py lite0-cpu          # the default model (lite0, 224x224) on this machine's CPU
    python benchmarks/runtime_bench.py tiny-cpu           # a quick check of the whole chain (seconds)

Each scenario writes its report to benchmarks/results/bench_<scenario>/ (report.json, report.md, PNG plots). The models
themselves (tens of MB) are made in a work folder outside the repository (--work, default: the system temp folder) and
reused by later runs. The model is untrained: latency and throughput do not depend on the weights' values, and the
exported graph is exactly the one a trained model has.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# scenario -> (preset, batch sizes, adtr-bench options)
SCENARIOS: dict[str, dict] = {
    "lite0-cpu": {
        "preset": "lite0",
        "batch_sizes": "1,8",
        "options": ["--warmup", "3", "--min-iters", "20", "--min-seconds", "10", "--profile"],
    },
    "tiny-cpu": {
        "preset": "tiny",
        "batch_sizes": "1,8",
        "options": ["--warmup", "2", "--min-iters", "10", "--min-seconds", "1"],
    },
}


def make_models(preset: str, work: Path) -> tuple[Path, Path, Path]:
    """checkpoint.pt of an untrained `preset` model, its ONNX export (dynamo exporter, the default) and its TorchScript
    export, both through adtr-export's export_checkpoint (parity verified on the demo data's brick train/good images:
    an untrained checkpoint records none), in the `--format all` layout."""
    import torch

    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.model.adtr import ADTR
    from adtr_deploy.model.checkpoint import save_checkpoint
    from adtr_deploy.model.config import get_preset

    ckpt = work / "checkpoint.pt"
    export = work / "export"
    onnx_path, ts_path = export / "onnx" / "model.onnx", export / "torchscript" / "model.torchscript"
    good = images(work).parent / "train" / "good"
    if not ckpt.is_file():
        torch.manual_seed(0)
        save_checkpoint(ckpt, ADTR(get_preset(preset)).eval())
    if not onnx_path.is_file():
        export_checkpoint(ckpt, "onnx", onnx_path.parent, verify_images=str(good))
    if not ts_path.is_file():
        export_checkpoint(ckpt, "torchscript", ts_path.parent, verify_images=str(good))
    return ckpt, onnx_path, ts_path


def images(work: Path) -> Path:
    """The demo data set's brick test images (real photographs, 256x256 PNG) as input for timing and the pipeline."""
    from adtr_deploy.data.demo import write_demo_dataset

    root = work / "demo"
    if not (root / "brick" / ".adtr_demo.json").is_file():
        write_demo_dataset(root, categories=("brick",))
    return root / "brick" / "test"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--work", type=Path, default=None, help="folder for the models (default: temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: benchmarks/results/bench_*)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    sc = SCENARIOS[args.scenario]
    work = args.work or Path(tempfile.gettempdir()) / f"adtr-bench-{args.scenario}"
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"bench_{args.scenario.replace('-', '_')}"
    ckpt, onnx_path, _ = make_models(sc["preset"], work)
    cmd = [
        "--model", str(onnx_path),
        "--reference", str(ckpt),
        "--batch-sizes", sc["batch_sizes"],
        "--out", str(out),
        "--images", str(images(work)),
        *sc["options"],
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("adtr-bench " + " ".join(cmd), flush=True)

    from adtr_deploy.cli.bench import command

    try:
        command.main(cmd, prog_name="adtr-bench", standalone_mode=False)
    finally:
        shutil.rmtree(
            out / "profiles", ignore_errors=True
        )  # raw ORT traces: megabytes; their summary is in report.json
    return 0


if __name__ == "__main__":
    sys.exit(main())
