"""Resident memory of `adtr-run --streams N`: N ONNX Runtime sessions (one copy of the weights each, as before
2026-12-03) against the runtime's streams now (one session run concurrently when each stream has one thread).

    python benchmarks/streams_memory.py --model EXPORT/model.onnx [--streams 1,2,4] [--out TABLE.md]
    python benchmarks/streams_memory.py --model EXPORT/model.onnx --streams 2 --seconds 20 --rounds 3

`--seconds S` times instead: in one process, windows of S seconds of batch-1 frames on every stream at once (frames
per second over all streams), N sessions and the runtime's streams alternating for `--rounds` pairs: the shared session
must not cost throughput.

Each row is a fresh Python process that opens the model, runs 3 batches of 1 on each stream concurrently, and reports
its resident memory (VmRSS) and peak (VmHWM) above what it held before opening the model. Memory does not depend on the
weights' values, so an untrained export measures like a trained one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, threading
import numpy as np

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) / 1024 for l in fh if l.startswith(key))

import onnxruntime as ort
from adtr_deploy.runtime.backends import OnnxRuntimeBackend

path, mode, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
base = status("VmRSS:")
if mode == "sessions":  # what --streams N opened before: N sessions of 1 thread
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"]) for _ in range(n)]
    name = sessions[0].get_inputs()[0].name
    size = sessions[0].get_inputs()[0].shape[1:3]
    run = lambda i, x: sessions[i].run(None, {name: x})
else:  # the runtime now
    backend = OnnxRuntimeBackend(path, threads=n, streams=n)
    size = backend.spec.input_size
    run = lambda i, x: backend.run(x)
loaded = status("VmRSS:")
x = np.zeros((1, *size, 3), np.uint8)
threads = [threading.Thread(target=lambda i=i: [run(i, x) for _ in range(3)]) for i in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
import time
frames = [0] * n
def loop(i):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        run(i, x)
        frames[i] += 1
t0 = time.perf_counter()
threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
fps = sum(frames) / (time.perf_counter() - t0) if seconds > 0 else 0.0
print(f"{loaded - base:.0f} {status('VmRSS:') - base:.0f} {status('VmHWM:') - base:.0f} {fps:.3f}")
"""


def measure(model: Path, mode: str, n: int, seconds: float = 0.0) -> tuple[float, ...]:
    """(MB after loading, MB after running, peak MB, frames/s or 0) of one fresh process."""
    cmd = [sys.executable, "-c", CHILD, str(model), mode, str(n), str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return tuple(float(v) for v in out.stdout.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported model.onnx (model.json beside it)")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--seconds", type=float, default=0.0, help="also time this long per process (0: memory only)")
    parser.add_argument("--rounds", type=int, default=1, help="with --seconds: alternate the two kinds this often")
    args = parser.parse_args(argv)
    if args.seconds > 0:
        return _timing(args)
    lines = [
        "| streams | before: N sessions, MB after loading / after running / peak | now, MB after loading / after running / peak |",
        "|---:|---|---|",
    ]
    for n in (int(v) for v in args.streams.split(",")):
        before, now = measure(args.model, "sessions", n)[:3], measure(args.model, "runtime", n)[:3]
        lines.append(f"| {n} | {' / '.join(f'{v:.0f}' for v in before)} | {' / '.join(f'{v:.0f}' for v in now)} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


TIMING = r"""
import sys, threading, time
import numpy as np
import onnxruntime as ort
from adtr_deploy.runtime.backends import OnnxRuntimeBackend

path, n, seconds, rounds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
sessions = [ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"]) for _ in range(n)]
name = sessions[0].get_inputs()[0].name
backend = OnnxRuntimeBackend(path, threads=n, streams=n)
x = np.zeros((1, *backend.spec.input_size, 3), np.uint8)
runs = {"sessions": lambda i: sessions[i].run(None, {name: x}), "runtime": lambda i: backend.run(x)}

def window(mode):
    frames = [0] * n
    end = time.perf_counter() + seconds
    def loop(i):
        while time.perf_counter() < end:
            runs[mode](i)
            frames[i] += 1
    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return sum(frames) / (time.perf_counter() - t0)

window("sessions"), window("runtime")  # warm-up
for r in range(rounds):
    order = ("sessions", "runtime") if r % 2 == 0 else ("runtime", "sessions")
    fps = {mode: window(mode) for mode in order}
    print(f"{fps['sessions']:.3f} {fps['runtime']:.3f}", flush=True)
"""


def _timing(args) -> int:
    """Frames per second of N streams as N sessions and as the runtime opens them, in one process, alternating
    windows of --seconds (paired: whatever else loads the machine hits both alike)."""
    import statistics

    lines = [
        "| streams | window pair | before: N sessions, frames/s | now, frames/s | now / before |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in (int(v) for v in args.streams.split(",")):
        cmd = [sys.executable, "-c", TIMING, str(args.model), str(n), str(args.seconds), str(args.rounds)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        ratios = []
        for r, line in enumerate(out.stdout.split("\n")):
            if not line.strip():
                continue
            before, now = (float(v) for v in line.split())
            ratios.append(now / before)
            lines.append(f"| {n} | {r + 1} | {before:.2f} | {now:.2f} | {ratios[-1]:.3f} |")
        lines.append(
            f"| {n} | median ({min(ratios):.3f}-{max(ratios):.3f}) | | | **{statistics.median(ratios):.3f}** |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
