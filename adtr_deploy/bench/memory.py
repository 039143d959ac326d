"""Memory of each backend, measured in a fresh child process that loads only that backend.

In one process that holds every backend, resident memory freed by one stays in the allocator's heap and hides the next
one's peak. A child per backend measures what a deployment that runs only that backend needs:
- `baseline_mb`: the interpreter with the backend's libraries imported, before the model is loaded;
- `loaded_mb`: after loading the model (`load_mb` = the difference);
- per batch size, `peak_rss_mb`: the kernel's high-water mark over two inferences (the first grows arenas and caches), and
  `peak_over_loaded_mb` = that minus `loaded_mb`: activations and workspaces. Batch sizes run in ascending order.
- on a GPU, PyTorch's peak allocation or the device's memory in use (see runners.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from adtr_deploy.fileio import dumps_strict

CHILD_TIMEOUT_S = 900


def _rss() -> int:
    from adtr_deploy.bench.timing import rss_bytes

    return rss_bytes()


def probe(desc: dict, batch_sizes: list[int], image_files: list[str], input_size: tuple[int, int]) -> dict:
    """Run in the child: load the runners of `desc`, run each batch size, return the memory figures (MB)."""
    from adtr_deploy.bench.runners import build_runners
    from adtr_deploy.bench.timing import read_hwm, reset_hwm
    from adtr_deploy.preprocess import load_image, stack_batch

    if desc["kind"] == "reference" or desc.get("name", "").startswith("torchscript"):
        import torch  # noqa: F401  (imported before the baseline: the library is part of it, not of the model)
    else:
        import onnxruntime  # noqa: F401
    images = [load_image(image_files[i % len(image_files)], input_size) for i in range(max(batch_sizes))]
    baseline = _rss()
    runners = build_runners(desc)
    loaded = _rss()
    exact = reset_hwm() and read_hwm() is not None
    out: dict = {"baseline_mb": baseline / 2**20, "loaded_mb": loaded / 2**20, "load_mb": (loaded - baseline) / 2**20}
    out["torch_imported"] = "torch" in sys.modules  # a runtime-only deployment never loads it
    out["method"] = "VmHWM (kernel peak RSS), child process" if exact else "RSS after the calls (no peak counter here)"
    out["runners"] = {}
    for bs in sorted(batch_sizes):
        batch = stack_batch(images[:bs])
        for r in runners:
            call = r.bind(batch)
            if exact:
                reset_hwm()
            call()
            gpu = r.gpu_peak(call) if r.gpu_peak is not None else None
            peak = (read_hwm() if exact else None) or _rss()
            out["runners"].setdefault(r.name, {})[str(bs)] = {
                "peak_rss_mb": peak / 2**20,
                "peak_over_loaded_mb": (peak - loaded) / 2**20,
                "gpu": gpu,
            }
    return out


def measure_memory(
    descs: list[dict], batch_sizes: list[int], image_files: list[str], input_size: tuple[int, int]
) -> list[dict]:
    """Run `probe` for every description, each in its own fresh Python process, all at once (memory figures do not
    depend on timing, and the children's start-up, mostly importing torch, overlaps). A child that fails gives
    {"error": ...}: memory is then missing, not invented."""
    procs = []
    for desc in descs:
        payload = json.dumps(
            {"desc": desc, "batch_sizes": list(batch_sizes), "images": image_files, "input_size": list(input_size)}
        )
        env = dict(os.environ)
        if desc.get("threads"):
            env["OMP_NUM_THREADS"] = str(desc["threads"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "adtr_deploy.bench.memory"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append((proc, payload))
    results = []
    for proc, payload in procs:
        try:
            out, err = proc.communicate(payload, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results.append({"error": f"the memory probe did not finish within {CHILD_TIMEOUT_S} s"})
            continue
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (err.strip().splitlines() or ["no output"])[-1][:300]
            results.append({"error": f"the memory probe failed: {tail}"})
        else:
            results.append(json.loads(lines[-1]))
    return results


def main() -> None:
    args = json.loads(sys.stdin.read())
    result = probe(args["desc"], args["batch_sizes"], args["images"], tuple(args["input_size"]))
    sys.stdout.write(dumps_strict(result) + "\n")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of engine threads: the figures are already written
