"""Soak: a live source through the real Pipeline and ONNX Runtime backend for a million frames; memory must stay flat.

    flock /tmp/adtr-cpu.lock python benchmarks/soak.py                    # 1,000,000 frames (about 10 min on 2 cores)
    python benchmarks/soak.py --frames 50000 --out /tmp/soak_quick        # a quick look

The model is the tests' tiny ADTR (64x64 input, calibrated; tests.runtime_fixtures), opened with the package's own
`open_model`; the run is the package's `Pipeline` writing results.jsonl into a temporary --out with rotation and
`--keep` retention on (so the disk side is exercised too), exactly as `adtr-run --resume --keep` runs a camera.

The source is `FastLiveSource` below, an in-process live source (`live = True`, so the pipeline treats it as a camera:
window of one batch, segments, overlays per segment) that hands out a few pre-encoded JPEG frames as fast as they are
asked for, each one decoded by the pipeline's workers as a real MJPEG frame is; every 50,000 frames it reports a
stream outage, so the gap bookkeeping is soaked as well. It stands in for a camera because a real MJPEG server on this
2-core box would take half the CPU and cap the rate far below what a million frames in 20 minutes needs.

Resident memory (RSS, from /proc/self/statm) is sampled every 5,000 frames; after a warm-up (the first 10% of the
frames: ONNX Runtime's arenas, thread pools, allocator caches), the growth must stay within 10 MB. Writes
benchmarks/results/soak.json, soak.md and soak.png (RSS over frames).

--serve attaches what `adtr-run --serve 127.0.0.1:0 --sink http://127.0.0.1:PORT/hook` attaches, built the same way
(cli.run_options.make_service, Service.pipeline_hooks, runtime.drift.DriftMonitor, Service.attach_drift/start/close):
the live state, /metrics, a webhook sink (with its spool) to a local receiver in a thread that answers 200 and counts
messages, and the drift monitor; a thread polls /api/status, /metrics and /healthz once a second during the run. The
threshold is set between the six frames' scores (from a 6-frame run first) so one frame in six is an anomaly and the
sink and spool carry traffic.

    flock /tmp/adtr-cpu.lock python benchmarks/soak.py --serve --frames 200000 --out benchmarks/results/soak_serve.json
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from adtr_deploy.bench.studies import command_line, machine, write_result
from adtr_deploy.runtime.frames import Frame, Source

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_MB = 10.0
GAP_EVERY = 50_000


class FastLiveSource(Source):
    """A camera that never waits: pre-encoded JPEG frames handed out in turn, with a reported outage now and then.
    Its own state is bounded (a frame counter, the last few gaps), like the real LiveSource's should be."""

    live = True

    def __init__(self, frames: list[bytes], total: int):
        super().__init__("soak://fast-live")
        self.frames = frames
        self.limit = total
        self.index = 0
        self.gaps: list[dict] = []
        self.gap_count = 0

    def read(self, timeout: float) -> Frame | None:
        if self.index >= self.limit:
            time.sleep(min(timeout, 0.01))
            return None  # live sources never end; the run stops at --max-frames
        i = self.index
        self.index += 1
        gap = None
        if i and i % GAP_EVERY == 0:
            now = time.time()
            gap = {"start": now - 1.0, "end": now, "duration_s": 1.0, "attempts": 1, "reason": "soak"}
            self.gaps = [*self.gaps[-99:], gap]
            self.gap_count += 1
        return Frame(
            source=self.name,
            frame=i,
            key=f"frame_{i:07d}",
            timestamp=time.time(),
            data=self.frames[i % len(self.frames)],
            gap=gap,
        )

    def stats(self) -> dict:
        return {"dropped": 0, "gaps": list(self.gaps), "reconnects": self.gap_count, "received": self.index}


def export_tiny(work: Path) -> Path:
    """The tests' tiny model (tests.runtime_fixtures.onnx_model), exported by a child process and copied to `work`."""
    code = (
        "import shutil, sys; from tests import runtime_fixtures as rf; "
        "shutil.copytree(rf.onnx_model().parent, sys.argv[1], dirs_exist_ok=True)"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code, str(work)], check=True, cwd=root)
    return work / "model.onnx"


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Receiver:
    """A webhook receiver on 127.0.0.1 in a thread: answers 200 to every POST and counts the messages."""

    def __init__(self):
        self.messages = 0
        self.events: dict[str, int] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    event = str(json.loads(body).get("event"))
                except (ValueError, AttributeError):
                    event = "unreadable"
                receiver.messages += 1
                receiver.events[event] = receiver.events.get(event, 0) + 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, name="soak-receiver", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Poller:
    """Polls the live view's /api/status, /metrics and /healthz once a second, as a dashboard and a probe would."""

    PATHS = ("api/status", "metrics", "healthz")

    def __init__(self, base_url: str):
        self.base = base_url
        self.ok = {p: 0 for p in self.PATHS}
        self.failed = {p: 0 for p in self.PATHS}
        self.last_error: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-poller", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for path in self.PATHS:
                try:
                    with urllib.request.urlopen(self.base + path, timeout=5) as resp:
                        resp.read()
                        self.ok[path] += resp.status == 200
                except OSError as exc:
                    self.failed[path] += 1
                    self.last_error = f"{path}: {exc}"

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def anomaly_threshold(backend, frames: list[bytes], Pipeline, RunOptions) -> float:
    """A threshold between the two highest of the frames' scores (one 6-frame run of the same Pipeline), so that one
    frame in len(frames) is an anomaly."""
    scores: list[float] = []
    with tempfile.TemporaryDirectory(prefix="adtr-soak-scores-") as tmp:
        options = RunOptions(batch_size=len(frames), max_frames=len(frames))
        src = FastLiveSource(frames, len(frames))
        Pipeline(
            backend,
            src,
            Path(tmp) / "out",
            options,
            on_record=lambda r, c: scores.append(r["score"]),
            log=lambda m: None,
        ).run()
    top = sorted(scores)[-2:]
    return (top[0] + top[1]) / 2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=5_000, help="sample RSS every N frames")
    parser.add_argument("--keep", default="200MB", help="retention of the run's closed segments (as adtr-run --keep)")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="attach what adtr-run --serve 127.0.0.1:0 --sink http://127.0.0.1:PORT/hook attaches, and poll the server",
    )
    args = parser.parse_args(argv)

    from adtr_deploy.runtime.backends import open_model
    from adtr_deploy.runtime.outdir import result_files
    from adtr_deploy.runtime.pipeline import Pipeline, RunOptions
    from tests import runtime_fixtures as rf

    work = Path(tempfile.mkdtemp(prefix="adtr-soak-model-"))
    model = export_tiny(work)  # in a child process: this one never imports torch, as on a camera box
    backend = open_model(model, "cpu")
    frames = rf.jpeg_frames(6)
    source = FastLiveSource(frames, args.frames)
    threshold = anomaly_threshold(backend, frames, Pipeline, RunOptions) if args.serve else None
    samples: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    disk_max = [0]

    def on_record(record: dict, counts: dict) -> None:
        n = counts["images"]
        if n % args.every == 0:
            samples.append((n, round(rss_mb(), 2), round(time.perf_counter() - t0, 1)))
            if n % (10 * args.every) == 0:
                disk = sum(p.stat().st_size for p in result_files(out))
                disk_max[0] = max(disk_max[0], disk)
                print(f"{n} frames  rss {samples[-1][1]:.1f} MB  results on disk {disk / 1e6:.0f} MB", flush=True)

    with tempfile.TemporaryDirectory(prefix="adtr-soak-") as tmp:
        out = Path(tmp) / "out"
        start_rss = rss_mb()
        options = RunOptions(batch_size=args.batch_size, max_frames=args.frames, keep=(args.keep,), threshold=threshold)
        attached = attach(args, backend, out, threshold) if args.serve else None
        hooks = attached["hooks"] if attached else {}
        pipeline = Pipeline(backend, source, out, options, on_record=on_record, log=lambda m: None, **hooks)
        if attached:
            attached["service"].start(pipeline, backend, model)
            attached["poller"] = Poller(attached["service"].url)
        try:
            summary = pipeline.run()
        finally:
            serve_result = detach(attached) if attached else None
        segments = len(result_files(out))
        disk_end = sum(p.stat().st_size for p in result_files(out))
    backend.close()
    shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t0
    torch_loaded = "torch" in sys.modules

    warm = next(i for i, s in enumerate(samples) if s[0] >= args.frames // 10)
    after = [s[1] for s in samples[warm:]]
    growth_end = after[-1] - after[0]
    growth_max = max(after) - after[0]
    result = {
        "frames": summary["images"],
        "ok": summary["ok"],
        "wall_s": round(wall, 1),
        "frames_per_s": round(summary["images"] / wall, 1),
        "batch_size": args.batch_size,
        "rss_start_mb": round(start_rss, 1),
        "rss_at_warmup_mb": after[0],
        "warmup_frames": samples[warm][0],
        "rss_end_mb": after[-1],
        "rss_max_after_warmup_mb": max(after),
        "growth_after_warmup_mb": round(growth_end, 2),
        "max_growth_after_warmup_mb": round(growth_max, 2),
        "goal_mb": GOAL_MB,
        "within_goal": growth_max <= GOAL_MB,
        "keep": args.keep,
        "results_on_disk_max_mb": round(disk_max[0] / 1e6, 1),
        "results_on_disk_end_mb": round(disk_end / 1e6, 1),
        "segment_files_at_end": segments,
        "gaps_total": summary["gaps_total"],
        "gaps_listed": len(summary["gaps"]),
        "latency_ms": summary["latency_ms"],
        "source": "FastLiveSource (in-process live source serving 6 pre-encoded 72x96 JPEG frames; see soak.py)",
        "model": "tests' tiny ADTR, 64x64 input, ONNX Runtime CPU (adtr_deploy.runtime.open_model)",
        "torch_imported": torch_loaded,
        "attached": (
            "Service (live state, /metrics, HTTP server on 127.0.0.1:0), a webhook sink with its spool to a local "
            "receiver, the drift monitor; /api/status, /metrics and /healthz polled once a second"
            if args.serve
            else None
        ),
        "serve": serve_result,
        "samples": samples,
        "command": command_line("soak.py", argv),
        "machine": machine(),
    }
    result["png"] = args.out.with_suffix(".png").name
    write_result(result, args.out, markdown)
    plot(result, args.out.with_suffix(".png"))
    return result


def attach(args, backend, out: Path, threshold: float) -> dict:
    """The observers adtr-run --serve 127.0.0.1:0 --sink URL attaches, built as cli/run.py builds them."""
    from adtr_deploy.cli.run_options import make_service
    from adtr_deploy.runtime.drift import DriftMonitor

    receiver = Receiver()
    service = make_service(out, {"serve": "127.0.0.1:0", "sinks": (receiver.url,)})
    hooks = service.pipeline_hooks()
    drift = DriftMonitor(backend.spec.calibration, threshold=threshold)  # adtr-run's defaults (--drift-window/-sigmas)
    drift_events: list[str] = []
    drift.listeners.append(lambda event: drift_events.append(str(event.get("event"))))
    hooks["observers"] = [drift.observe, *hooks.get("observers", ())]
    service.attach_drift(drift)
    return {
        "service": service,
        "receiver": receiver,
        "hooks": hooks,
        "drift_events": drift_events,
        "threshold": threshold,
    }


def detach(attached: dict) -> dict:
    """Stop polling, close the service (drains the sinks) and the receiver; what each of them did."""
    service, receiver = attached["service"], attached["receiver"]
    poller = attached.get("poller")
    if poller:
        poller.close()
    service.linger(0, {})
    service.close()
    sink = service.sink_stats()[0]
    receiver.close()
    return {
        "threshold": round(attached["threshold"], 6),
        "sink_at_end": {k: sink[k] for k in ("sent", "dropped", "failed", "retries", "queued", "last_error")},
        "received_messages": receiver.messages,
        "received_by_event": receiver.events,
        "drift_events": len(attached["drift_events"]),
        "polls_ok": poller.ok if poller else {},
        "polls_failed": poller.failed if poller else {},
        "poll_last_error": poller.last_error if poller else None,
    }


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [s[0] for s in r["samples"]]
    rss = [s[1] for s in r["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(frames, rss, lw=1.2, color="#3949ab", label="RSS")
    ax.axvline(r["warmup_frames"], color="grey", ls=":", label="end of warm-up")
    ax.axhline(r["rss_at_warmup_mb"] + GOAL_MB, color="#c62828", ls="--", label=f"warm-up + {GOAL_MB:g} MB (goal)")
    ax.set_xlabel("frames")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(
        f"adtr Pipeline soak{' (--serve, --sink, drift)' if r.get('attached') else ''}: {r['frames']:,} live frames, growth after warm-up {r['growth_after_warmup_mb']} MB"
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def serve_lines(r: dict) -> list[str]:
    """The --serve figures: what the sink delivered, what the poller got."""
    s = r.get("serve")
    if not s:
        return []
    sink = s["sink_at_end"]
    polls = ", ".join(f"/{p} {s['polls_ok'][p]} ok / {s['polls_failed'][p]} failed" for p in s["polls_ok"])
    return [
        f"| threshold (between the frames' top two scores: 1 frame in 6 flagged) | {s['threshold']} |",
        f"| webhook: received by the local receiver ({s['received_by_event']}) | {s['received_messages']:,} |",
        f"| webhook sink: sent / dropped (spool full) / failed / retries / left queued | {sink['sent']:,} / "
        f"{sink['dropped']:,} / {sink['failed']:,} / {sink['retries']:,} / {sink['queued']:,} |",
        f"| drift events (start/clear) | {s['drift_events']} |",
        f"| polls during the run | {polls} |",
    ]


def markdown(r: dict) -> str:
    verdict = "within" if r["within_goal"] else "**over**"
    if r.get("attached"):
        title = f"# Soak with --serve and --sink: {r['frames']:,} live frames through the real Pipeline"
        what = (
            "the Pipeline, its decode workers, the backend, results rotation and retention, and attached as "
            f"`adtr-run --serve 127.0.0.1:0 --sink http://127.0.0.1:PORT/hook` attaches them: {r['attached']}."
        )
    else:
        title = "# Soak: a million live frames through the real Pipeline"
        what = (
            "the Pipeline, its decode workers, the backend, results rotation and retention; not --serve, --sink or "
            "the drift monitor (no observers attached; see soak_serve.md for those)."
        )
    return "\n".join(
        [
            title,
            "",
            f"Reproduce: `flock /tmp/adtr-cpu.lock {r['command'].strip()}`",
            "",
            f"Source: {r['source']}. Model: {r['model']}. Batch {r['batch_size']}, --keep {r['keep']}. What is soaked: "
            + what,
            "",
            "| figure | value |",
            "|---|---|",
            f"| frames (ok) | {r['frames']:,} ({r['ok']:,}) |",
            f"| wall time | {r['wall_s']} s ({r['frames_per_s']} frames/s) |",
            f"| RSS at start / after warm-up ({r['warmup_frames']:,} frames) / end | {r['rss_start_mb']} / "
            f"{r['rss_at_warmup_mb']} / {r['rss_end_mb']} MB |",
            f"| growth after warm-up: at the end / at most | {r['growth_after_warmup_mb']} / "
            f"{r['max_growth_after_warmup_mb']} MB ({verdict} the {r['goal_mb']:g} MB goal) |",
            f"| results on disk: at most / at the end ({r['segment_files_at_end']} files) | "
            f"{r['results_on_disk_max_mb']} / {r['results_on_disk_end_mb']} MB (--keep {r['keep']}) |",
            f"| outages reported / listed in the summary | {r['gaps_total']} / {r['gaps_listed']} |",
            f"| latency p50 / p99 | {r['latency_ms']['p50']} / {r['latency_ms']['p99']} ms |",
            *serve_lines(r),
            "",
            f"![RSS over frames]({r['png']})",
            "",
            f"Machine: {r['machine']['cpus']} CPUs, load {r['machine']['loadavg_1m_at_end']:.1f} at the end.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
