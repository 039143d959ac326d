"""Shared artifacts for the runtime tests: one tiny ADTR exported to ONNX once per test process, plus image files.

The export is cached for the whole session (test_runtime, test_sources and test_run_cli all use it) because even the
tiny model takes seconds to export on 2 cores.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.spec import Calibration, ModelSpec
from tests.conftest import texture_images

INPUT_SIZE = 64


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="adtr-runtime-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def reference_model():
    """The PyTorch reference (tiny preset, fixed seed), in eval mode."""
    import torch

    from adtr_deploy.model import ADTR, get_preset

    torch.manual_seed(0)
    return ADTR(get_preset("tiny")).eval()


def reference_outputs(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        amap, score = reference_model()(torch.from_numpy(batch))
    return amap.numpy(), score.numpy()


@functools.cache
def calibration() -> Calibration:
    """Calibration from real images through the reference, so thresholds split real scores (not a made-up number)."""
    from adtr_deploy.calibration import calibrate

    maps, scores = reference_outputs(texture_images(6, INPUT_SIZE, seed=100))
    cal = calibrate(scores, maps)
    # A threshold at the median of these scores makes both decisions occur on texture images.
    return dataclasses.replace(cal, threshold=float(np.median(scores)))


@functools.cache
def onnx_model() -> Path:
    """model.onnx + model.json written by the project's export (dynamic batch, uint8 NHWC input "image", outputs
    "anomaly_map" and "score", spec embedded in the ONNX metadata too), from a checkpoint carrying `calibration()`.

    The TorchScript-based ONNX exporter (dynamo=False) is used because it is several times faster than the dynamo
    exporter on 2 cores; verification is off because the runtime tests compare with the reference themselves.
    """
    from adtr_deploy.export import export_checkpoint
    from adtr_deploy.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(_workdir() / "checkpoint.pt", reference_model(), calibration=calibration())
    return Path(export_checkpoint(ckpt, "onnx", _workdir() / "export", verify=False, dynamo=False).path)


def spec() -> ModelSpec:
    """The spec the export wrote beside the model."""
    return ModelSpec.load(onnx_model().with_name("model.json"))


def copy_model(dest: Path, spec_override: ModelSpec | None = None) -> Path:
    """A copy of the exported model in `dest` (optionally with another model.json), for tests that change the spec."""
    dest.mkdir(parents=True, exist_ok=True)
    src = onnx_model()
    shutil.copy(src, dest / src.name)
    (spec_override or spec()).save(dest / "model.json")
    return dest / src.name


def start_interruptible(cmd: list[str], env: dict) -> subprocess.Popen:
    """Start a CLI child that a test will stop with a signal. SIGINT goes back to its default in the child: a test run
    started in the background (`cmd &`) inherits SIGINT ignored, and Python then keeps ignoring it, as a backgrounded
    adtr-run should (SIGTERM still stops it)."""
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def write_images(folder: Path, n: int, *, seed: int = 0, sizes=((96, 80), (64, 64), (120, 150))) -> list[Path]:
    """Real texture crops written as PNG/JPEG files at assorted sizes (the runtime must resize them itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    imgs = texture_images(n, 160, seed=seed)
    paths = []
    for i, img in enumerate(imgs):
        h, w = sizes[i % len(sizes)]
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        path = folder / f"img_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def jpeg_frames(n: int, size: tuple[int, int] = (72, 96), seed: int = 3) -> list[bytes]:
    """n real-texture JPEG frames (H, W = size)."""
    out = []
    for img in texture_images(n, 128, seed=seed):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        assert ok
        out.append(buf.tobytes())
    return out


class MjpegServer:
    """A local HTTP MJPEG camera on 127.0.0.1 (multipart/x-mixed-replace JPEG frames), for stream tests.

    plan: what each successive connection does, as ("stream", n_frames, then) with then in
    "cut" (stop mid-frame and drop the connection), "hold" (keep the connection open, silent, until stopped) or
    "close" (end cleanly); connections beyond the plan repeat its last entry. After a "cut", requests get HTTP 503 for
    `down_s` seconds: the camera is away. Every loop is bounded by n_frames and by stop().
    """

    def __init__(self, plan, *, interval_s: float = 0.02, down_s: float = 0.0, content_length: bool = True):
        import http.server
        import threading

        self.plan = list(plan)
        self.interval_s = interval_s
        self.down_s = down_s
        self.content_length = content_length
        self.frames = jpeg_frames(6)
        self.connections = 0
        self.sent = 0
        self.down_until = 0.0
        self.stopped = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                owner._serve(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _part(self, jpg: bytes) -> bytes:
        head = b"--frame\r\nContent-Type: image/jpeg\r\n"
        if self.content_length:
            head += b"Content-Length: %d\r\n" % len(jpg)
        return head + b"\r\n" + jpg + b"\r\n"

    def _serve(self, h) -> None:
        import time

        if time.time() < self.down_until:
            h.send_error(503, "camera away")
            return
        kind, n, then = self.plan[min(self.connections, len(self.plan) - 1)]
        self.connections += 1
        h.send_response(200)
        h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        h.end_headers()
        try:
            for i in range(n):
                if self.stopped.is_set():
                    return
                h.wfile.write(self._part(self.frames[i % len(self.frames)]))
                h.wfile.flush()
                self.sent += 1
                self.stopped.wait(self.interval_s)
            if then == "cut":
                jpg = self.frames[0]
                h.wfile.write(self._part(jpg)[: len(jpg) // 2])  # half a frame, then the line goes dead
                h.wfile.flush()
                self.down_until = time.time() + self.down_s
                h.close_connection = True
            elif then == "hold":
                self.stopped.wait(30)
            else:
                h.wfile.write(b"--frame--\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def __enter__(self) -> MjpegServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
