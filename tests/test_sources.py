"""Sources: files, folders, globs, list files, videos written with OpenCV, and a local HTTP MJPEG camera that drops out.

Every loop here is bounded in count and in time, so a broken source fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from adtr_deploy.preprocess import prepare
from adtr_deploy.runtime.sources import END, ImageFiles, LiveSource, VideoFile, decode_frame, open_source
from tests import runtime_fixtures as rf
from tests.conftest import texture_images


def drain(source, limit: int = 500, timeout_s: float = 20.0) -> list:
    """Every frame of a finite source (bounded)."""
    frames, t0 = [], time.monotonic()
    while len(frames) < limit and time.monotonic() - t0 < timeout_s:
        f = source.read(0.1)
        if f is END:
            return frames
        if f is not None:
            frames.append(f)
    raise AssertionError(f"the source did not end within {limit} frames / {timeout_s} s")


def write_video(path: Path, n: int, fps: float = 12.0, size=(80, 96)) -> list[np.ndarray]:
    """An MJPG .avi of n real-texture frames; returns the frames as written (BGR)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size[1], size[0]))
    assert writer.isOpened()
    frames = []
    for img in texture_images(n, 128, seed=7):
        bgr = cv2.cvtColor(cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
        writer.write(bgr)
        frames.append(bgr)
    writer.release()
    return frames


def test_folder_is_read_recursively_in_sorted_order_with_non_images_reported(tmp_path):
    rf.write_images(tmp_path / "b_sub", 2, seed=1)
    rf.write_images(tmp_path, 2, seed=2)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")  # hidden files are not inputs
    src = open_source(str(tmp_path))
    assert isinstance(src, ImageFiles) and src.total == 5
    with src:
        frames = drain(src)
    rel = [Path(f.source).relative_to(tmp_path).as_posix() for f in frames]
    assert rel == ["b_sub/img_00.png", "b_sub/img_01.jpg", "img_00.png", "img_01.jpg", "notes.txt"]
    assert [f.error is None for f in frames] == [True, True, True, True, False]
    assert "not an image file" in frames[-1].error
    # overlay keys are unique and keep the subfolder
    assert frames[0].key == "b_sub/img_00_png" and len({f.key for f in frames}) == 5
    assert decode_frame(frames[2]).shape == (96, 80, 3)


def test_glob_and_list_file_sources(tmp_path):
    paths = rf.write_images(tmp_path / "imgs", 3, seed=3)
    src = open_source(str(tmp_path / "imgs" / "*.png"))
    assert [Path(f.source) for f in drain(src)] == [paths[0], paths[2]]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# inspection batch\nimgs/{paths[1].name}\n\n{paths[0]}\nimgs/missing.png\n")
    frames = drain(open_source(str(listing)))
    assert [Path(f.source).name for f in frames] == [paths[1].name, paths[0].name, "missing.png"]
    assert frames[0].error is None and frames[1].error is None
    assert "does not exist" in frames[2].error


@pytest.mark.parametrize(
    "text, message",
    [
        ("{tmp}/nope.png", "is not an existing file or folder"),
        ("{tmp}/*.bmp", "matches no files"),
        ("{tmp}/empty_dir", "holds no files"),
    ],
)
def test_unusable_sources_are_one_sentence(tmp_path, text, message):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=message):
        open_source(text.format(tmp=tmp_path))


def test_video_file_gives_every_frame_in_order(tmp_path):
    path = tmp_path / "clip.avi"
    write_video(path, 9, fps=12.0)
    src = open_source(str(path))
    assert isinstance(src, VideoFile)
    with src:
        frames = drain(src)
    assert src.fps == pytest.approx(12.0) and src.total == 9
    assert [f.frame for f in frames] == list(range(9))
    np.testing.assert_allclose([f.timestamp for f in frames], np.arange(9) / 12.0, atol=1e-6)
    # the pixels are OpenCV's own decoding of the file, converted to RGB by preprocess
    cap = cv2.VideoCapture(str(path))
    for f in frames:
        ok, bgr = cap.read()
        assert ok
        np.testing.assert_array_equal(decode_frame(f), prepare(bgr, bgr.shape[:2], bgr=True))
    cap.release()


def test_unreadable_video_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="cannot be opened as a video"):
        open_source(str(path)).start()


def test_live_stream_hands_out_the_newest_frame_and_counts_the_stale_ones():
    with rf.MjpegServer([("stream", 10, "hold")], interval_s=0.005) as server:
        src = LiveSource(server.url, timeout_s=5.0)
        src.start()
        try:
            t0 = time.monotonic()
            while src.received < 10 and time.monotonic() - t0 < 10:
                time.sleep(0.01)
            assert src.received == 10
            frame = src.read(1.0)
            assert frame.frame == 9 and src.dropped == 9  # only the newest is processed
            assert decode_frame(frame).shape == (72, 96, 3)
            assert src.read(0.1) is None  # nothing new yet: no frame is handed out twice
        finally:
            src.close()


def test_live_stream_that_drops_is_reopened_and_the_gap_recorded():
    """The camera cuts off mid-frame, answers 503 for 0.3 s, then streams again; parts carry no Content-Length."""
    plan = [("stream", 4, "cut"), ("stream", 400, "close")]
    with rf.MjpegServer(plan, interval_s=0.01, down_s=0.3, content_length=False) as server:
        src = LiveSource(server.url, timeout_s=2.0, backoff_s=0.2)
        src.start()
        gap_frame, t0 = None, time.monotonic()
        try:
            while gap_frame is None and time.monotonic() - t0 < 15:
                f = src.read(0.1)
                if f is not None and f.gap is not None:
                    gap_frame = f
            stats = src.stats()
        finally:
            src.close()
    assert gap_frame is not None, "no frame after the outage carried the gap"
    gap = gap_frame.gap
    assert gap["end"] > gap["start"] and gap["duration_s"] >= 0.2  # at least one backoff delay
    assert gap["attempts"] >= 1 and server.connections >= 2
    assert stats["reconnects"] >= 1 and stats["gaps"][0] == gap
    assert decode_frame(gap_frame).shape == (72, 96, 3)


def test_unreachable_stream_fails_at_start_with_one_sentence():
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="cannot open stream"):
        LiveSource(f"http://127.0.0.1:{port}/video", timeout_s=1.0).start()


class TrickleServer:
    """A local HTTP server that answers one byte at a time, every `every_s` seconds: the status line and headers, or,
    on the first connection when `frames_first` > 0, the next frame after that many whole ones. Bounded by stop()."""

    def __init__(self, every_s: float, frames_first: int = 0):
        import socket
        import threading

        self.every_s = every_s
        self.frames_first = frames_first
        self.connections = 0
        self.stopped = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        import threading

        self.sock.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n"
        jpg = rf.jpeg_frames(1)[0]
        part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n"
        first = self.connections == 1 and self.frames_first
        whole, trickled = (head + part * self.frames_first, part) if first else (b"", head)
        try:
            conn.sendall(whole)
            for i in range(len(trickled)):  # bounded: one part at most
                if self.stopped.wait(self.every_s):
                    break
                conn.sendall(trickled[i : i + 1])
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> TrickleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_a_trickling_stream_fails_the_open_within_the_timeout_instead_of_taking_minutes():
    with TrickleServer(every_s=0.3) as server:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"cannot open stream .*no complete answer within 1\.5 s"):
            LiveSource(server.url, timeout_s=1.5).start()
        took = time.monotonic() - t0
    assert took < 1.5 + 2.0, f"the open took {took:.1f} s"  # headers alone are ~80 bytes: 24 s at this pace


def test_a_stream_that_trickles_mid_run_is_a_counted_outage_and_close_does_not_wait_for_it():
    """Whole frames first, then a frame one byte at a time: the source goes down within the timeout, every reopen
    attempt is counted (each one trickles its headers, and each is cut at the deadline), and close() returns at once,
    even in the middle of an attempt."""
    with TrickleServer(every_s=0.2, frames_first=3) as server:
        src = LiveSource(server.url, timeout_s=1.0, backoff_s=0.1, backoff_max_s=0.2)
        src.start()
        try:
            t0 = time.monotonic()
            while src.stats()["up"] and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            down_after = time.monotonic() - t0
            stats = src.stats()
            assert not stats["up"] and stats["outage_start"] is not None and stats["received"] == 3
            assert down_after < 1.0 + 2.0, f"the stall was noticed after {down_after:.1f} s"
            while src.stats()["reconnects"] < 2 and time.monotonic() - t0 < 15:
                time.sleep(0.05)
            assert src.stats()["reconnects"] >= 2 and src.stats()["outages"] == 1  # one outage, several attempts
        finally:
            t1 = time.monotonic()
            src.close()
            closed_in = time.monotonic() - t1
    assert closed_in < 1.0, f"close() took {closed_in:.1f} s"
    assert server.connections >= 3


def test_adtr_run_on_a_trickling_stream_fails_in_timeout_and_a_stream_going_bad_mid_run_keeps_duration(tmp_path):
    """Through the CLI: a trickle from the start is one sentence within --timeout; a stream that turns into a trickle
    mid-run (every reconnect attempt trickling too) still ends at --duration, not minutes later."""
    from click.testing import CliRunner

    from adtr_deploy.cli.run import command

    model = rf.onnx_model()
    with TrickleServer(every_s=0.3) as server:
        t0 = time.monotonic()
        args = ["--model", model, "--source", server.url, "--out", tmp_path / "a", "--timeout", "1", "--quiet"]
        result = CliRunner().invoke(command, [str(a) for a in args])
        took = time.monotonic() - t0
    assert result.exit_code == 1 and "no complete answer within 1 s" in result.output, result.output
    assert took < 1 + 15, f"{took:.1f} s"  # the model loads after the source opened: this bounds the open itself
    assert not (tmp_path / "a" / "results.jsonl").exists()

    with TrickleServer(every_s=0.3, frames_first=3) as server:
        args = ["--model", model, "--source", server.url, "--out", tmp_path / "b", "--timeout", "1", "--duration", "3"]
        t0 = time.monotonic()
        result = CliRunner().invoke(command, [str(a) for a in [*args, "--quiet"]])
        took = time.monotonic() - t0
    assert result.exit_code == 0, result.output
    assert took < 3 + 1 + 5, f"--duration 3 took {took:.1f} s"
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["stopped"] == "duration" and summary["reconnects"] >= 1
