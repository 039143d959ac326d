"""What serving the live view costs the run: `adtr-run` over one video without --serve, and with --serve and 10 viewers.

    python benchmarks/serve_overhead.py                       # tiny model, 10 viewers, 3 interleaved rounds (minutes)
    python benchmarks/serve_overhead.py --preset lite0 --frames 300   # the default model (untrained export)

Each round runs the same adtr-run three times, in rotating order: no serving; serving with 10 viewers that do what the
page does (poll /api/status twice a second, fetch each new frame and each new gallery thumbnail); serving with 10
/stream.mjpg clients. The viewers run in a separate process (real viewers sit on other machines, but here they share
the CPU with the run, so the figure includes their cost too). Reported: images/s from each run's own summary.json
(the pipeline's wall time) and CPU seconds per image of the adtr-run process itself (user+system, from wait4), the
latter being far less sensitive to other load on a shared machine.

The model is the tests' tiny ADTR (64x64 input): inference is so cheap that the per-frame bookkeeping and the drawing
for viewers weigh the most they ever can; with a real model the relative cost is smaller.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adtr_deploy.bench.studies import command_line, machine, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("none", "page", "mjpeg")
MODELS = {"tiny": "the tests' tiny ADTR (64x64 input, calibrated)", "lite0": "untrained lite0 (224x224 input)"}
URL_LINE = re.compile(r"live view on (http://\S+/) ")
SERVE_CPU_LINE = re.compile(r"serving used ([0-9.]+) s of CPU \(([^)]*)\)")


# -- viewers (run in their own process: `serve_overhead.py --viewers URL N MODE`) ------------------------------------
def _page_viewer(url: str, stop: threading.Event) -> None:
    """What the page does, over one keep-alive connection as a browser keeps it."""
    host, port = urllib.parse.urlsplit(url)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    since, frame_seq, thumbs = 0, 0, set()

    def fetch(path: str) -> bytes:
        conn.request("GET", path)
        return conn.getresponse().read()

    while not stop.is_set():
        try:
            s = json.loads(fetch(f"/api/status?view=1&since={since}"))
            if s["timeline"]:
                since = s["timeline"][-1][0]
            if s["frame"]["seq"] != frame_seq:
                fetch("/frame.jpg")
                frame_seq = s["frame"]["seq"]
            for g in s["gallery"]:
                if g["id"] not in thumbs:
                    fetch(f"/gallery/{g['id']}.jpg")
                    thumbs.add(g["id"])
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()  # the run ended, or the server closed an idle connection: reconnect on the next poll
        stop.wait(0.5)


def _mjpeg_viewer(url: str, stop: threading.Event) -> None:
    try:
        with urllib.request.urlopen(f"{url}stream.mjpg", timeout=10) as r:
            while not stop.is_set() and r.read(65536):
                pass
    except OSError:
        pass


def viewers(url: str, n: int, mode: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    target = _page_viewer if mode == "page" else _mjpeg_viewer
    threads = [threading.Thread(target=target, args=(url, stop), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    stop.wait()


def export_untrained(preset: str, work: Path) -> Path:
    """model.onnx of an untrained `preset` (fixed seed), through the project's own export (TorchScript-based exporter,
    the fast one; no verification: only speed is measured here)."""
    import torch

    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.model import ADTR, get_preset
    from adtr_deploy.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(work / "checkpoint.pt", ADTR(get_preset(preset)).eval())
    return Path(export_checkpoint(ckpt, "onnx", work / "export", verify=False, dynamo=False).path)


# -- runs --------------------------------------------------------------------------------------------------------------
def one_run(model: Path, clip: Path, out: Path, mode: str, n_viewers: int) -> dict:
    """One adtr-run; returns its summary plus the process's CPU seconds and the viewers' mode."""
    cmd = [sys.executable, "-c", "from adtr_deploy.cli.main import run_entry; run_entry()"]
    cmd += ["--model", str(model), "--source", str(clip), "--out", str(out)]
    if mode != "none":
        cmd += ["--serve", "127.0.0.1:0", "--serve-linger", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    viewer_proc = None
    if mode != "none":
        for line in proc.stderr:
            m = URL_LINE.search(line)
            if m:
                me = [sys.executable, __file__, "--viewers", m.group(1), str(n_viewers), mode]
                viewer_proc = subprocess.Popen(me, env=env)
                break
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.append(proc.stderr.read()), daemon=True)
    drain.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if viewer_proc is not None:
        viewer_proc.terminate()
        viewer_proc.wait(timeout=30)
    if proc.returncode != 0:
        raise SystemExit(f"adtr-run failed in mode {mode} (exit {proc.returncode})")
    drain.join(timeout=30)
    summary = json.loads((out / "summary.json").read_text())
    cpu = usage.ru_utime + usage.ru_stime
    served = SERVE_CPU_LINE.search("".join(rest))
    serve_cpu = float(served.group(1)) if served else 0.0
    return {
        "mode": mode,
        "images": summary["images"],
        "images_per_s": summary["throughput_fps"],
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_image": round(1000 * cpu / summary["images"], 3),
        "serve_cpu_s": serve_cpu,  # what the service measured on its own threads (time.thread_time)
        "serve_cpu_share": round(serve_cpu / cpu, 4),
        "serve_cpu_parts": served.group(2) if served else None,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1500, help="Frames in the test video (360x480 MJPG).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--viewers", type=int, default=10)
    ap.add_argument(
        "--preset", default="tiny", help="tiny (the tests' calibrated model) or a preset to export untrained."
    )
    ap.add_argument("--out", default=None, help="Default: benchmarks/results/serve_overhead[_PRESET].json")
    args = ap.parse_args(argv)

    from tests import runtime_fixtures as rf
    from tests.test_sources import write_video

    work = Path(tempfile.mkdtemp(prefix="adtr-serve-bench-"))
    try:
        if args.preset == "tiny":
            model = rf.onnx_model()
        else:  # an untrained export of the preset: timing does not depend on the weights
            model = export_untrained(args.preset, work)
        clip = work / "line.avi"
        write_video(clip, args.frames, fps=25.0, size=(360, 480))
        runs = []
        for r in range(args.rounds):
            order = MODES[r % 3 :] + MODES[: r % 3]  # rotate, so no mode always runs first
            for mode in order:
                run = one_run(model, clip, work / f"out_{r}_{mode}", mode, args.viewers)
                run["round"] = r
                print(json.dumps(run), flush=True)
                runs.append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["mode"] == mode)

    def paired(mode: str, key: str) -> float:
        """Median over rounds of (mode / none) within the same round: load that drifts between rounds cancels."""
        base = {x["round"]: x[key] for x in runs if x["mode"] == "none"}
        return round(statistics.median(x[key] / base[x["round"]] for x in runs if x["mode"] == mode), 4)

    summary = {
        mode: {
            "images_per_s": median(mode, "images_per_s"),
            "cpu_ms_per_image": median(mode, "cpu_ms_per_image"),
            "throughput_ratio_vs_none": paired(mode, "images_per_s"),
            "cpu_ratio_vs_none": paired(mode, "cpu_ms_per_image"),
            "serve_cpu_share": median(mode, "serve_cpu_share"),
        }
        for mode in MODES
    }
    result = {
        "command": command_line("serve_overhead.py", argv),
        "frames": args.frames,
        "video": "360x480 MJPG, texture frames",
        "model": MODELS.get(args.preset, f"untrained {args.preset}") + ", ONNX Runtime CPU, batch 1, 2 decode workers",
        "viewers": args.viewers,
        "rounds": args.rounds,
        "summary": summary,
        "runs": runs,
        "machine": machine(omp_num_threads=os.environ.get("OMP_NUM_THREADS", "1")),
    }
    suffix = "" if args.preset == "tiny" else f"_{args.preset}"
    return write_result(result, args.out or RESULTS / f"serve_overhead{suffix}.json", markdown)


def markdown(r: dict) -> str:
    rows = "\n".join(
        f"| {mode} | {s['images_per_s']:.1f} | {s['throughput_ratio_vs_none']:.3f} | {s['cpu_ms_per_image']:.2f} | "
        f"{s['cpu_ratio_vs_none']:.3f} | **{100 * s['serve_cpu_share']:.1f}%** |"
        for mode, s in r["summary"].items()
    )
    per_run = ", ".join(f"{x['mode']} {x['images_per_s']:.0f}" for x in r["runs"])
    spread = [x["images_per_s"] for x in r["runs"] if x["mode"] == "none"]
    m = r["machine"]
    return f"""# What serving the live view costs a run

Command: `{r["command"]}`

The same `adtr-run` over a {r["frames"]}-frame video ({r["video"]}; {r["model"]}), {r["rounds"]} interleaved rounds in
rotating order. Modes: `none` (no --serve), `page` ({r["viewers"]} viewers polling /api/status twice a second and
fetching each new frame and thumbnail over keep-alive connections, as the page does), `mjpeg` ({r["viewers"]}
/stream.mjpg clients). Images/s and CPU are medians; the ratios are medians of per-round ratios against `none` of the
same round. CPU ms/image: the adtr-run process's user+system time (wait4), startup included. **Serving CPU share**: the
CPU the service measured on its own threads (time.thread_time around the per-record bookkeeping on the inference
thread, the drawing thread and every HTTP request) over the process's total CPU: on a CPU-bound box this is the share
of throughput serving takes, and unlike wall time it does not move with other load. Not in it: the one-time import
and start of the server (about the same in every run, in the CPU column).

| mode | images/s | throughput vs none | CPU ms/image | CPU vs none | serving CPU share |
|---|---|---|---|---|---|
{rows}

Images/s per run, in run order: {per_run}. Runs without serving alone range from {min(spread):.0f} to
{max(spread):.0f} images/s: other jobs shared this machine (load average {m["loadavg_1m_at_end"]:.1f} on
{m["cpus"]} CPUs at the end), so wall-time ratios cannot resolve a few percent here; the serving CPU share can. The
viewers ran in a separate process on the same 2 CPUs (real viewers sit on other machines), so their own CPU also
slowed the served runs' wall time.
"""


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--viewers":
        viewers(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
