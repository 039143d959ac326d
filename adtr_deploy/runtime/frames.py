"""Frames and the Source interface every input (files, videos, cameras, streams) implements (numpy + OpenCV only).

Decoding is NOT done by sources for files and stream packets: a Frame carries a path or the encoded bytes, and the
pipeline's workers decode them through adtr_deploy.preprocess (`decode_frame`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adtr_deploy.preprocess import ImageDecodeError, decode_image, read_image, to_rgb_uint8

END = object()  # read() returns END once a finite source is exhausted


@dataclass
class Frame:
    """One image or video frame, not yet decoded (path or encoded bytes) or already decoded (`image`)."""

    source: str  # file path, video path, URL or "camera:N"
    frame: int  # index within its source (0 for a still image)
    key: str  # unique, filesystem-safe name for this frame's outputs (overlays)
    timestamp: float  # seconds: position in a video, capture time (Unix epoch) for images and live frames
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)
    bgr: bool = True  # colour order of `image`
    error: str | None = None  # known to be unreadable before decoding (missing file, not an image)
    gap: dict | None = None  # live: the stream outage that ended just before this frame
    acquired: float = field(default_factory=time.perf_counter)  # when the source handed it out, for latency


def decode_frame(frame: Frame, max_pixels: int | None = None) -> np.ndarray:
    """The frame's pixels as uint8 RGB at their original size, via adtr_deploy.preprocess. Raises ImageDecodeError.

    Files and packets declaring more than `max_pixels` pixels are refused from their header, before decoding."""
    if frame.error:
        raise ImageDecodeError(frame.error)
    if frame.path is not None:
        return read_image(frame.path, max_pixels=max_pixels)
    if frame.data is not None:
        return decode_image(frame.data, name=f"{frame.source} frame {frame.frame}", max_pixels=max_pixels)
    return to_rgb_uint8(frame.image, bgr=frame.bgr)


class Source:
    """Base: `start()`, `read(timeout) -> Frame | None (nothing yet) | END`, `close()`, `stats()`."""

    live = False
    total: int | None = None  # number of frames when known (files, videos)
    fps: float | None = None  # frame rate when known (videos, cameras)

    def __init__(self, name: str):
        self.name = name

    def start(self) -> None:
        pass

    def read(self, timeout: float) -> Frame | None | object:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"dropped": 0, "gaps": [], "reconnects": 0}

    def __enter__(self) -> Source:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
