"""Tiling at native resolution (numpy + OpenCV, torch-free), shared by training, evaluation and the runtime.

A large image is not resized to the model's input: it is resized by `scale` (1 = native resolution), cut into tiles of
the model's input size that overlap by `overlap` of a tile side (the last tile of a row or column ends on the image's
edge; an image smaller than a tile is padded by reflection), the tiles go through the model in batches of at most
`batch` (one image's tiles only), and their maps are stitched back with a separable Hann window per tile, so that each
pixel is a weighted mean of the tiles covering it and a tile's borders count least. The image score comes from the
stitched map exactly as the model's own score comes from its map: the maximum of the map average-pooled with the
tiling's `score_pool` window (stride 1, no padding; ADTR.map_and_score; by default the model's own window,
`--tile ...,score_pool=N` sets another). The exported graph does not change: the
settings travel in model.json (`ModelSpec.tiling`, written from the checkpoint's info by adtr-export), so the runtime
tiles exactly as training did.

Memory for one image, besides the image: the resized copy, one batch of tiles, and the stitched map (a float64 sum
and the float32 result at the resized size: 12 bytes a pixel); the window's weights are two 1-D arrays, since the
window and the grid are separable. So a 20-megapixel frame costs about 240 MB at scale 1, whatever its tile count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import cv2
import numpy as np

from adtr_deploy.errors import UserError
from adtr_deploy.preprocess import resize, stack_batch

DEFAULT_OVERLAP = 0.25
MAX_OVERLAP = 0.75
TILE_BATCH = 8  # tiles per model call at inference (fewer when the model's batch is smaller)
AUTO_MAX_TILES = 64  # --tile auto: native resolution unless a training image would need more tiles than this
CROPS = ("grid", "random")
OFF = ("off", "none", "no")


class TilingError(UserError):
    """Tiling settings are malformed, or the model's and the requested ones disagree."""


@dataclass(frozen=True)
class Tiling:
    """How images are tiled. `scale` None means "auto", resolved from the training images' size by `resolve`."""

    tile: tuple[int, int]  # (H, W): the model's input size
    scale: float | None = 1.0  # the image is resized by this factor before tiling; 1 = native resolution
    overlap: float = DEFAULT_OVERLAP  # fraction of a tile side shared with the neighbour
    score_pool: int = 16  # the model's score pooling window, applied to the stitched map
    crops: str = "grid"  # training crops: the tiling grid of every image, or as many random crops per image
    version: int = 1

    def __post_init__(self) -> None:
        th, tw = self.tile
        if not all(isinstance(v, int) and v > 0 for v in (th, tw)):
            raise TilingError(f"tile size {list(self.tile)} is not two positive integers")
        if self.scale is not None and not (isinstance(self.scale, int | float) and 0 < self.scale <= 8):
            raise TilingError(f"tile scale {self.scale!r} is not a number in (0, 8]; 1 means native resolution")
        if not (isinstance(self.overlap, int | float) and 0 <= self.overlap <= MAX_OVERLAP):
            raise TilingError(f"tile overlap {self.overlap!r} is not a fraction between 0 and {MAX_OVERLAP}")
        if not (isinstance(self.score_pool, int) and self.score_pool > 0):
            raise TilingError(f"tile score_pool {self.score_pool!r} is not a positive integer")
        if self.crops not in CROPS:
            raise TilingError(f"tile crops {self.crops!r} is not one of {', '.join(CROPS)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tile": list(self.tile)}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "the tiling settings") -> Tiling:
        if not isinstance(data, dict):
            raise TilingError(f"{origin}: tiling is not an object; re-export the model with adtr-export")
        try:
            known = {"tile", "scale", "overlap", "score_pool", "crops", "version"}
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs["tile"] = tuple(int(v) for v in kwargs["tile"])
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise TilingError(f"{origin}: tiling is malformed ({exc}); re-export the model with adtr-export") from None
        except TilingError as exc:
            raise TilingError(f"{origin}: {exc}; re-export the model with adtr-export") from None

    def describe(self, pool: bool = False) -> str:
        scale = "auto" if self.scale is None else ("native" if self.scale == 1 else f"{self.scale:g}")
        return f"{scale},overlap={self.overlap:g}" + (f",score_pool={self.score_pool}" if pool else "")

    def same_as(self, other: Tiling | None) -> bool:
        """The same tiling at inference (training crops aside)."""
        if other is None:
            return False
        return (self.tile, self.scale, self.overlap, self.score_pool) == (
            other.tile,
            other.scale,
            other.overlap,
            other.score_pool,
        )


def parse_tile(text: str | None, tile: Sequence[int], score_pool: int) -> Tiling | None:
    """`--tile` text -> Tiling, or None for off. SCALE[,overlap=F][,size=N][,crops=grid|random][,score_pool=N]; SCALE
    is `native` (= 1), `auto` or a factor such as 0.5; `size=N` instead gives the side in source pixels one tile
    covers; `score_pool=N` the window of the stitched map's score (default: `score_pool`, the model's own; 16 for lite0:
    on validation a smaller window helped one category and hurt another, docs/train.md)."""
    if text is None or text.strip().lower() in OFF:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    kwargs: dict[str, Any] = {"tile": (int(tile[0]), int(tile[1])), "score_pool": int(score_pool)}
    hint = (
        "e.g. --tile native, --tile 0.5,overlap=0.25, --tile size=448, --tile auto,crops=random or "
        "--tile native,score_pool=8"
    )
    try:
        for i, part in enumerate(parts):
            key, eq, value = part.partition("=")
            key = key.lower()
            if not eq and i == 0:
                kwargs["scale"] = 1.0 if key == "native" else None if key == "auto" else float(key)
            elif key == "overlap":
                kwargs["overlap"] = float(value)
            elif key == "size":
                kwargs["scale"] = min(kwargs["tile"]) / float(value)
            elif key == "crops":
                kwargs["crops"] = value.lower()
            elif key == "score_pool":
                kwargs["score_pool"] = int(value)
            else:
                raise ValueError(part)
        return Tiling(**kwargs)
    except ValueError:
        raise TilingError(f"--tile {text!r} is not understood; {hint}") from None
    except TilingError as exc:
        raise TilingError(f"--tile {text!r}: {exc}; {hint}") from None


def positions(length: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one side: the first at 0, the last ending on the edge, spread evenly, neighbours sharing at
    least `overlap` of a tile."""
    if length <= tile:
        return [0]
    stride = max(1, int(math.floor(tile * (1.0 - overlap))))
    n = int(math.ceil((length - tile) / stride)) + 1
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def scaled_size(hw: Sequence[int], scale: float) -> tuple[int, int]:
    return max(1, int(round(hw[0] * scale))), max(1, int(round(hw[1] * scale)))


def resolve(tiling: Tiling, image_hw: Sequence[int]) -> Tiling:
    """`auto` -> a scale for images of this size: 1 (native) unless that needs more than AUTO_MAX_TILES tiles, else the
    largest scale (in steps of 1 %) that needs no more."""
    if tiling.scale is not None:
        return tiling
    scale = 1.0
    while scale > 0.01:
        h, w = scaled_size(image_hw, scale)
        count = len(positions(h, tiling.tile[0], tiling.overlap)) * len(positions(w, tiling.tile[1], tiling.overlap))
        if count <= AUTO_MAX_TILES:
            break
        scale = round(scale - 0.01, 2)
    return replace(tiling, scale=scale)


@dataclass(frozen=True)
class Grid:
    """Where the tiles of one image lie, in the resized image (padded to at least one tile)."""

    source_hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def box(self, i: int) -> tuple[int, int]:
        return self.ys[i // len(self.xs)], self.xs[i % len(self.xs)]


def grid(image_hw: Sequence[int], tiling: Tiling) -> Grid:
    if tiling.scale is None:
        raise TilingError("tile scale `auto` was never resolved; train again, or give --tile a scale")
    sh, sw = scaled_size(image_hw, tiling.scale)
    th, tw = tiling.tile
    ph, pw = max(sh, th), max(sw, tw)
    ys = tuple(positions(ph, th, tiling.overlap))
    xs = tuple(positions(pw, tw, tiling.overlap))
    return Grid((int(image_hw[0]), int(image_hw[1])), (sh, sw), (ph, pw), ys, xs)


def scaled_image(image: np.ndarray, g: Grid) -> np.ndarray:
    """uint8 RGB at its source size -> resized by the scale (the project's one resize rule), padded by reflection to at
    least one tile."""
    img = resize(image, g.scaled_hw)
    dh, dw = g.padded_hw[0] - g.scaled_hw[0], g.padded_hw[1] - g.scaled_hw[1]
    if dh or dw:
        border = cv2.BORDER_REFLECT_101 if min(g.scaled_hw) > 1 else cv2.BORDER_REPLICATE
        img = cv2.copyMakeBorder(img, 0, dh, 0, dw, border)
    return img


def tile_batches(img: np.ndarray, g: Grid, tile: Sequence[int], batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, uint8 (n, th, tw, 3)) for the tiles of a resized image, `batch` at a time."""
    th, tw = int(tile[0]), int(tile[1])
    for start in range(0, len(g), max(1, int(batch))):
        boxes = [g.box(i) for i in range(start, min(start + batch, len(g)))]
        yield start, np.ascontiguousarray(np.stack([img[y : y + th, x : x + tw] for y, x in boxes]))


def window_1d(n: int) -> np.ndarray:
    """Hann weights, never zero: sin^2(pi (i + 0.5) / n)."""
    return np.sin(np.pi * (np.arange(n, dtype=np.float64) + 0.5) / n) ** 2


class Stitcher:
    """Sum of window-weighted tile maps; `result()` divides by the summed weights and crops to the resized image."""

    def __init__(self, g: Grid, tile: Sequence[int]):
        self.g = g
        self.th, self.tw = int(tile[0]), int(tile[1])
        self.wy, self.wx = window_1d(self.th), window_1d(self.tw)
        self.weight = np.outer(self.wy, self.wx)
        self.total = np.zeros(g.padded_hw, dtype=np.float64)
        dy, dx = np.zeros(g.padded_hw[0]), np.zeros(g.padded_hw[1])
        for y in g.ys:
            dy[y : y + self.th] += self.wy
        for x in g.xs:
            dx[x : x + self.tw] += self.wx
        self.dy, self.dx = dy, dx

    def add(self, start: int, maps: np.ndarray) -> None:
        """Maps (n, 1, th, tw) or (n, th, tw) of tiles start .. start + n - 1."""
        maps = np.asarray(maps).reshape(-1, self.th, self.tw)
        for k, m in enumerate(maps):
            y, x = self.g.box(start + k)
            self.total[y : y + self.th, x : x + self.tw] += self.weight * m

    def result(self) -> np.ndarray:
        """The stitched map, float32 (h, w) at the resized image's size (once: it divides the sum in place)."""
        sh, sw = self.g.scaled_hw
        out = self.total[:sh, :sw]
        out /= self.dy[:sh, None]
        out /= self.dx[None, :sw]
        return out.astype(np.float32)


def pooled_max(amap: np.ndarray, pool: int) -> float:
    """max of the map average-pooled with a pool x pool window (stride 1, no padding): ADTR.map_and_score's score.
    A map smaller than the window is pooled with a window of its size."""
    h, w = amap.shape[-2:]
    kh, kw = min(pool, h), min(pool, w)
    src = np.ascontiguousarray(amap, dtype=np.float32).reshape(h, w)
    # anchor (0, 0): output (i, j) is the mean of rows i .. i + kh - 1 and columns j .. j + kw - 1 (OpenCV sums float32
    # input in float64); the valid outputs are those whose window lies inside the map.
    pooled = cv2.boxFilter(src, -1, (kw, kh), anchor=(0, 0), normalize=True, borderType=cv2.BORDER_CONSTANT)
    return float(pooled[: h - kh + 1, : w - kw + 1].max())


def run_tiled(
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], image: np.ndarray, tiling: Tiling, batch: int
) -> tuple[np.ndarray, float]:
    """One uint8 RGB image at its source size -> (stitched map float32 at the resized size, image score). `run` is a
    backend's run: uint8 (n, th, tw, 3) -> (maps (n, 1, th, tw), scores (n,)); it only ever sees this image's tiles."""
    g = grid(image.shape[:2], tiling)
    img = scaled_image(image, g)
    stitch = Stitcher(g, tiling.tile)
    for start, tiles in tile_batches(img, g, tiling.tile, batch):
        maps, _ = run(tiles)
        stitch.add(start, maps)
    del img
    amap = stitch.result()
    return amap, pooled_max(amap, tiling.score_pool)


def training_crops(image: np.ndarray, tiling: Tiling, rng: np.random.Generator) -> list[np.ndarray]:
    """Crops of one good training image at the model's input size: its tiling grid, or (crops="random") as many crops
    at random positions of the resized image."""
    g = grid(image.shape[:2], tiling)
    img = scaled_image(image, g)
    th, tw = tiling.tile
    if tiling.crops == "grid":
        boxes = [g.box(i) for i in range(len(g))]
    else:
        ph, pw = g.padded_hw
        boxes = [(int(rng.integers(0, ph - th + 1)), int(rng.integers(0, pw - tw + 1))) for _ in range(len(g))]
    return [np.ascontiguousarray(img[y : y + th, x : x + tw]) for y, x in boxes]


def from_spec(spec: Any) -> Tiling | None:
    """The tiling a model.json records (None: the model takes whole images resized to its input)."""
    record = getattr(spec, "tiling", None)
    return None if record is None else Tiling.from_dict(record, "model.json")


def check_requested(model: Tiling | None, requested: str | None, where: str = "this model") -> Tiling | None:
    """The tiling to run with: the model's, unless `requested` (a --tile text; None = as the model says) differs, which
    is refused in one sentence: a model scores only the way it was trained."""
    if requested is None:
        return model
    tile, pool = (model.tile, model.score_pool) if model else ((1, 1), 1)
    asked = parse_tile(requested, tile, pool) if model else (None if requested.strip().lower() in OFF else requested)
    if model is None and asked is None:
        return None
    if model is None:
        raise TilingError(
            f"{where} was trained on whole images resized to its input, not on tiles, so it cannot run with --tile "
            f"{requested}; drop --tile, or train a model with adtr-train --tile"
        )
    if asked is None:
        raise TilingError(
            f"{where} was trained on tiles ({model.describe()}) and scores only tiled images; drop --tile {requested} "
            "to run it as trained"
        )
    if not model.same_as(replace(asked, crops=model.crops)):
        pool = model.score_pool != asked.score_pool
        raise TilingError(
            f"{where} was trained on tiles {model.describe(pool)}, not {asked.describe(pool)}; drop --tile to run it "
            "as trained, or train a model with these settings"
        )
    return model


def run_frames(backend: Any, images: Sequence[np.ndarray], tiling: Tiling | None) -> tuple[Any, np.ndarray]:
    """The runtime's model call for a batch of frames -> (maps, scores (N,)). Untiled: `images` are at the input size
    and run as one batch, maps (N, 1, H, W). Tiled: `images` are at their source size and each frame's tiles run on
    their own (frames never share a model call), maps a list of (1, h, w) at each frame's resized size."""
    if tiling is None:
        return backend.run(stack_batch(images))
    batch = min(TILE_BATCH, backend.max_batch or TILE_BATCH)
    maps, scores = [], []
    for image in images:
        amap, score = run_tiled(backend.run, image, tiling, batch)
        maps.append(amap[None])
        scores.append(score)
    return maps, np.asarray(scores, dtype=np.float32)
