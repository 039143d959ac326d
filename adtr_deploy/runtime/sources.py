"""Where frames come from: image files (one, a folder, a glob, a list file), a video file, a camera or a network stream.

Every source hands out `Frame`s through `read(timeout)` (see adtr_deploy.runtime.frames). Finite sources (files,
videos) give every frame, in order, then END; every input named by the user gets exactly one frame, so one record:
a missing file, a dangling link or a non-image file included (as an error). Live sources (camera, RTSP, HTTP) live in
adtr_deploy.runtime.live and are re-exported here.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
import time
from pathlib import Path

import cv2

from adtr_deploy.errors import UserError
from adtr_deploy.preprocess import IMAGE_SUFFIXES
from adtr_deploy.runtime.frames import END, Frame, Source, decode_frame
from adtr_deploy.runtime.live import LiveSource, redact

__all__ = [
    "END",
    "Frame",
    "ImageFiles",
    "LiveSource",
    "Source",
    "VideoFile",
    "decode_frame",
    "list_folder",
    "open_source",
    "read_list_file",
    "redact",
]

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mjpeg")
LIST_SUFFIXES = (".txt", ".lst")


class ImageFiles(Source):
    """Still images, in the given order. Entries already known to be unreadable carry their reason.

    `skip(sources)` leaves out inputs recorded by an earlier run (--resume); the others keep their index, so their
    overlay names are those a full run would give."""

    def __init__(self, name: str, entries: list[tuple[Path, str | None]], root: Path | None = None):
        super().__init__(name)
        self.entries = entries
        self.root = root
        self.total = len(entries)
        self._order = list(range(len(entries)))
        self._next = 0

    def _key(self, i: int, path: Path) -> str:
        # a.png and a.jpg must not share an overlay: the suffix stays in the key as "_png"
        flat = path.name.replace(".", "_")
        if self.root is not None:
            return (path.relative_to(self.root).parent / flat).as_posix()  # subfolders are kept
        return flat if len(self.entries) == 1 else f"{i:05d}_{flat}"

    def skip(self, sources: set[str]) -> int:
        """Leave out the entries whose path (as recorded in a record's "source") is in `sources`; returns how many.
        Paths are compared resolved, so `images/` then `./images` or an absolute path still match."""
        before = len(self._order)
        done = {os.path.realpath(s) for s in sources}
        self._order = [i for i in self._order if os.path.realpath(self.entries[i][0]) not in done]
        self.total = len(self._order)
        return before - len(self._order)

    def read(self, timeout: float = 0.0) -> Frame | object:
        if self._next >= len(self._order):
            return END
        i = self._order[self._next]
        self._next += 1
        path, error = self.entries[i]
        return Frame(source=str(path), frame=0, key=self._key(i, path), timestamp=time.time(), path=path, error=error)


class VideoFile(Source):
    """Every frame of a video file, decoded in a reader thread (OpenCV releases the GIL) into a bounded queue."""

    def __init__(self, path: Path, queue_size: int = 16, max_pixels: int | None = None):
        super().__init__(str(path))
        self.path = path
        self.max_pixels = max_pixels
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, queue_size))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise UserError(
                f"{self.path} cannot be opened as a video (corrupt, or a codec OpenCV lacks); convert it to MP4 or AVI"
            )
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        if self.max_pixels and w * h > self.max_pixels:
            cap.release()
            raise UserError(
                f"{self.path} has {w}x{h} frames, more than the limit of {self.max_pixels / 1e6:g} MP; "
                "raise --max-pixels if the video is genuine"
            )
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 else None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.total = count if count > 0 else None
        self._thread = threading.Thread(target=self._loop, args=(cap,), name="adtr-video", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # blocks while the pipeline is behind: files never drop frames
                return True
            except queue.Full:
                continue
        return False

    def _loop(self, cap) -> None:
        index = 0
        try:
            while not self._stop.is_set():
                ok, img = cap.read()
                if not ok:
                    break
                ts = index / self.fps if self.fps else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                frame = Frame(source=self.name, frame=index, key=f"frame_{index:06d}", timestamp=ts, image=img)
                if not self._put(frame):
                    return
                index += 1
            if index == 0:
                self._put(Frame(self.name, 0, "frame_000000", 0.0, error=f"{self.path} has no decodable frame"))
        finally:
            cap.release()
            self._put(END)

    def read(self, timeout: float) -> Frame | None | object:
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, Frame):
            item.acquired = time.perf_counter()
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _is_url(text: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text))


def _file_entry(path: Path) -> tuple[Path, str | None]:
    if path.is_symlink() and not path.exists():
        return path, f"{path} is a link to a file that does not exist; fix or remove the link"
    if path.is_dir():
        return path, f"{path} is a folder, not an image file"
    if not path.is_file():
        return path, f"{path} does not exist; fix the path in the list"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return (
            path,
            f"{path} is not an image file ({path.suffix or 'no suffix'}); image types: {' '.join(IMAGE_SUFFIXES)}",
        )
    return path, None


def _is_entry(p: Path) -> bool:
    """A file, or a link (a dangling one too: it gets an error record instead of vanishing)."""
    return p.is_file() or p.is_symlink() and not p.is_dir()


def list_folder(root: Path) -> list[Path]:
    """Every file and link under `root`, recursively, sorted by relative path; hidden files and folders are skipped."""
    files = [
        p
        for p in root.rglob("*")
        if _is_entry(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_list_file(path: Path) -> list[Path]:
    """One path per line; blank lines and lines starting with # are skipped; relative paths are relative to the list."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def open_source(
    text: str | int, *, timeout_s: float = 5.0, queue_size: int = 16, max_pixels: int | None = None
) -> Source:
    """Resolve --source: camera index, URL, folder, list file (.txt), video file, image file or glob pattern."""
    if isinstance(text, int) or str(text).strip().isdigit():
        return LiveSource(int(text), timeout_s=timeout_s)
    text = str(text).strip()
    if not text:
        raise UserError("--source is empty; give an image, a folder, a glob, a list file, a video, a camera or a URL")
    if _is_url(text):
        return LiveSource(text, timeout_s=timeout_s)
    path = Path(text).expanduser()
    if path.is_dir():
        files = list_folder(path)
        if not files:
            raise UserError(f"folder {path} holds no files; point --source at a folder of images")
        return ImageFiles(str(path), [_file_entry(p) for p in files], root=path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LIST_SUFFIXES:
            paths = read_list_file(path)
            if not paths:
                raise UserError(f"list file {path} names no images; write one image path per line")
            return ImageFiles(str(path), [_file_entry(p) for p in paths])
        if suffix in VIDEO_SUFFIXES:
            return VideoFile(path, queue_size=queue_size, max_pixels=max_pixels)
        return ImageFiles(str(path), [(path, None)])  # any other file is tried as an image and reported if it is not
    if path.is_symlink():
        return ImageFiles(str(path), [_file_entry(path)])  # a dangling link: one error record, like in a folder
    if any(ch in text for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if _is_entry(Path(p)))
        if not matches:
            raise UserError(f"the pattern {text} matches no files; check it (quote it so the shell does not expand it)")
        return ImageFiles(text, [_file_entry(p) for p in matches])
    raise UserError(
        f"--source {text} is not an existing file or folder, a glob pattern, a camera index or a URL; check the path"
    )
