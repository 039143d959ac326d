"""What a person sees during a run: the --show window and the --save-video writer (OpenCV only)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from adtr_deploy.errors import UserError

DEFAULT_VIDEO_FPS = 10.0  # for --save-video when the source has no frame rate (images, most streams)


class Window:
    """--show: a cv2.imshow window, or a one-time notice when there is no display or OpenCV is the headless build."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.enabled = True
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            self._disable("there is no display (DISPLAY is not set)")

    def _disable(self, why: str) -> None:
        self.enabled = False
        self.log(f"--show is ignored: {why}; results and overlays are still written")

    def show(self, image_bgr: np.ndarray) -> bool:
        """Show one frame; False when the user closed the window or pressed q / Esc."""
        if not self.enabled:
            return True
        try:
            cv2.imshow("adtr-run", image_bgr)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error:
            self._disable("this OpenCV has no GUI support (opencv-python-headless); install opencv-python for a window")
            return True
        return key not in (ord("q"), 27)

    def close(self) -> None:
        if self.enabled:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass


class VideoOut:
    """--save-video: annotated frames at the first frame's size; the codec follows the suffix (.mp4 mp4v, else MJPG)."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.writer = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, image_bgr: np.ndarray) -> None:
        if self.writer is None:
            h, w = image_bgr.shape[:2]
            self.size = (w, h)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            codec = "mp4v" if self.path.suffix.lower() in (".mp4", ".m4v", ".mov") else "MJPG"
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*codec), self.fps, self.size)
            if not self.writer.isOpened():
                raise UserError(f"cannot write the video {self.path} with codec {codec}; use a .avi or .mp4 path")
        if (image_bgr.shape[1], image_bgr.shape[0]) != self.size:
            image_bgr = cv2.resize(image_bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(image_bgr)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
