"""The cost of the Triton server hop, and what its dynamic batcher gives back: local ONNX Runtime against the same model
served by a local Triton (2.51, nvidia-pytriton wheel, Python backend running adtr-deploy's runtime), at 1, 4 and 8
concurrent clients, in one run.

    flock /tmp/adtr-cpu.lock python benchmarks/triton_serving.py                      # lite0 (224x224), untrained
    flock /tmp/adtr-cpu.lock python benchmarks/triton_serving.py --preset tiny --seconds 5

Three ways to run the same exported model.onnx, each client sending one image per request and waiting for its answer
(what a camera-per-client line does):
- local: one OnnxRuntimeBackend in this process, shared by the client threads (adtr-run's own engine);
- triton: `adtr triton serve`'s server, model `adtr` with the dynamic batcher (preferred batch = the client count,
  queue delay --delay-us); each client thread has its own TritonBackend (HTTP, binary tensors);
- triton-nobatch: the same server and model files without a dynamic_batching block (one request per execution).
Cells run interleaved (rounds of every mode x clients), so load from elsewhere on the shared machine hits them alike.
Reported per cell: images/s over the wall time, latency p50/p99 of a request, and for Triton the mean batch the server
executed (inference_count / execution_count from its statistics). The server and this process share the machine's
cores, as they would on one edge box; the client side (tritonclient encoding, HTTP) is counted in Triton's figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adtr_deploy.bench.machine import machine_info  # noqa: E402
from adtr_deploy.bench.studies import command_line, write_result  # noqa: E402
from adtr_deploy.bench.timing import summarize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODES = ("local", "triton", "triton-nobatch")
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def export_untrained(preset: str, work: Path) -> Path:
    """model.onnx of an untrained `preset` (fixed seed) through the project's own export (no verification)."""
    import torch

    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.model import ADTR, get_preset
    from adtr_deploy.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(work / "checkpoint.pt", ADTR(get_preset(preset)).eval())
    return Path(export_checkpoint(ckpt, "onnx", work / "export", verify=False, dynamo=False).path)


def write_repo(model: Path, repo: Path, max_clients: int, delay_us: int) -> None:
    from adtr_deploy.export.triton import write_triton_repository

    batched = write_triton_repository(
        model,
        repo,
        backend="python",
        max_batch_size=max_clients,
        preferred_batch_sizes=(max_clients,),
        max_queue_delay_us=delay_us,
    )
    plain = repo / "adtr_nobatch"
    shutil.copytree(batched, plain)
    text = (plain / "config.pbtxt").read_text().replace('name: "adtr"', 'name: "adtr_nobatch"')
    start = text.index("dynamic_batching {")
    text = text[:start] + text[text.index("}\n", start) + 2 :]
    (plain / "config.pbtxt").write_text(text)


def stats(url: str, model: str) -> tuple[int, int]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/stats", timeout=10) as r:
        s = json.loads(r.read())["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


def run_cell(make_backend, clients: int, images, seconds: float) -> tuple[list[float], float]:
    """`clients` threads, each sending one image at a time for `seconds`; returns (latencies, wall seconds).
    Each thread makes its own client (tritonclient's HTTP client belongs to the thread that made it)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        backend = None
        try:
            backend = make_backend()
            backend.run(images[:1])  # connection and session warm
        except BaseException as exc:
            errors.append(exc)
        barrier.wait()
        k, lat = i, latencies[i]
        while backend is not None and not errors and time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            backend.run(images[k % len(images) : k % len(images) + 1])
            lat.append(time.perf_counter() - t0)
            k += clients
        if backend is not None and not getattr(backend, "_shared", False):  # the local one serves every cell
            backend.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while barrier.n_waiting < clients:  # every client made and warm: then the clock starts for all at once
        time.sleep(0.005)
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return [x for lat in latencies for x in lat], wall


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Local ONNX Runtime vs a local Triton server (Python backend), 1/4/8 concurrent clients",
        "",
        f"`{r['command']}`",
        "",
        f"Model: {r['model']} ({r['input']}); Triton {r['triton_version']} from nvidia-pytriton {r['pytriton']}, "
        f"Python backend (model.py running adtr-deploy's OnnxRuntimeBackend), {r['instances']} instance, "
        f"batcher queue delay {r['delay_us']} us; {r['seconds']:.0f} s per cell in {r['rounds']} interleaved rounds.",
        f"Machine: {m['cpu']} ({', '.join(r['cpu_flags']) or 'no AVX2'}), {m['logical_cpus']} logical CPUs, "
        f"load at start {m['load_average_start']}, at end {r['load_end']}; ONNX Runtime "
        f"{m['libraries'].get('onnxruntime')} here and in the server.",
        "",
        "| clients | mode | images/s | vs local | per round | p50 ms | p99 ms | mean executed batch |",
        "|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for c in r["clients"]:
        local = r["cells"][f"local@{c}"]["images_per_s"]
        for mode in MODES:
            cell = r["cells"][f"{mode}@{c}"]
            batch = f"{cell['mean_batch']:.2f}" if cell.get("mean_batch") else "-"
            lines.append(
                f"| {c} | {mode} | {cell['images_per_s']:.1f} | {cell['images_per_s'] / local:.2f}x | "
                f"{' / '.join(f'{x:.1f}' for x in cell['images_per_s_by_round'])} | "
                f"{cell['latency']['p50_ms']:.1f} | {cell['latency']['p99_ms']:.1f} | {batch} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="lite0", help="model preset, untrained (default lite0: 224x224)")
    ap.add_argument("--clients", default="1,4,8", help="concurrent client counts")
    ap.add_argument("--seconds", type=float, default=12.0, help="timed seconds per cell (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--delay-us", type=int, default=2000, help="the dynamic batcher's max queue delay")
    ap.add_argument("--python-env", default=None, help="an existing `adtr triton env` folder (default: make one)")
    ap.add_argument("--out", default=str(RESULTS / "triton_serving.json"))
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]

    import numpy as np

    from adtr_deploy.runtime.backends import OnnxRuntimeBackend
    from adtr_deploy.runtime.triton import TritonBackend
    from adtr_deploy.runtime.triton_env import make_env, require_env
    from adtr_deploy.runtime.triton_server import TritonServer, free_port

    machine = machine_info()  # the load at start is this one's; the load at the end is recorded below
    work = Path(tempfile.mkdtemp(prefix="adtr-triton-bench-"))
    try:
        model = export_untrained(args.preset, work)
        write_repo(model, work / "repo", max(clients), args.delay_us)
        env = require_env(args.python_env) if args.python_env else make_env(work / "env", log=print)
        local = OnnxRuntimeBackend(model)
        local._shared = True
        h, w = local.spec.input_size
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (16, h, w, 3), dtype=np.uint8)
        ports = {f"{k}_port": free_port() for k in ("http", "grpc", "metrics")}
        with TritonServer(work / "repo", python_env=env.prefix, **ports) as server:
            makers = {
                "local": lambda: local,
                "triton": lambda: TritonBackend("adtr", url=server.http_url, timeout_s=60),
                "triton-nobatch": lambda: TritonBackend("adtr_nobatch", url=server.http_url, timeout_s=60),
            }
            cells: dict[str, dict] = {
                f"{m}@{c}": {"lat": [], "wall": 0.0, "inf": 0, "exe": 0, "rounds": []} for m in MODES for c in clients
            }
            for rnd in range(args.rounds):
                for c in clients:
                    order = MODES[rnd % 3 :] + MODES[: rnd % 3]
                    for mode in order:
                        name = {"triton": "adtr", "triton-nobatch": "adtr_nobatch"}.get(mode)
                        before = stats(server.http_url, name) if name else (0, 0)
                        lat, wall = run_cell(makers[mode], c, images, args.seconds / args.rounds)
                        after = stats(server.http_url, name) if name else (0, 0)
                        cell = cells[f"{mode}@{c}"]
                        cell["lat"] += lat
                        cell["wall"] += wall
                        cell["inf"] += after[0] - before[0]
                        cell["exe"] += after[1] - before[1]
                        cell["rounds"].append(len(lat) / wall)
                        print(f"round {rnd + 1} clients {c} {mode}: {len(lat) / wall:.1f} images/s", flush=True)
            version = server.version
        local.close()
        from importlib.metadata import version as pkg_version

        result = {
            "command": command_line("triton_serving.py", argv),
            "model": f"untrained {args.preset}",
            "input": f"{h}x{w}",
            "triton_version": version,
            "pytriton": pkg_version("nvidia-pytriton"),
            "python_env": env.versions,
            "instances": 1,
            "delay_us": args.delay_us,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "clients": clients,
            "machine": machine,
            "cpu_flags": cpu_flags(),
            "cells": {
                k: {
                    "images_per_s": len(v["lat"]) / v["wall"],
                    "latency": summarize(v["lat"], 1),
                    "mean_batch": (v["inf"] / v["exe"]) if v["exe"] else None,
                    "images_per_s_by_round": v["rounds"],
                }
                for k, v in cells.items()
            },
        }
        import os

        result["load_end"] = [round(x, 2) for x in os.getloadavg()]
        return write_result(result, args.out, markdown)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
