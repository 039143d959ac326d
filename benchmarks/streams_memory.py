"""Resident memory of `adtr-run --streams N`: N ONNX Runtime sessions (one copy of the weights each, as before
2026-12-03) against the runtime's streams now (one session run concurrently when each stream has one thread).

    python benchmarks/streams_memory.py --model EXPORT/model.onnx [--streams 1,2,4] [--out benchmarks/results/streams_memory.md]

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

path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
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
print(f"{loaded - base:.0f} {status('VmRSS:') - base:.0f} {status('VmHWM:') - base:.0f}")
"""


def measure(model: Path, mode: str, n: int) -> tuple[float, ...]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), mode, str(n)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return tuple(float(v) for v in out.stdout.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported model.onnx (model.json beside it)")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    lines = [
        "| streams | before: N sessions, MB after loading / after running / peak | now, MB after loading / after running / peak |",
        "|---:|---|---|",
    ]
    for n in (int(v) for v in args.streams.split(",")):
        before, now = measure(args.model, "sessions", n), measure(args.model, "runtime", n)
        lines.append(f"| {n} | {' / '.join(f'{v:.0f}' for v in before)} | {' / '.join(f'{v:.0f}' for v in now)} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
