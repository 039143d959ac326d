"""Cameras of a line: `--source NAME=SOURCE` and the line file (`--line line.yaml` or `.json`), checked and saved.

A line file names the cameras of one `adtr-run` process and what each overrides:

    cameras:
      - {name: top, source: "rtsp://cam-top.local/stream1"}
      - {name: side, source: "http://cam-side.local/mjpeg", threshold: 0.42, save_overlays: true}
      - {name: station2, source: /data/station2.mp4, paused: true}

Every mistake is refused at start with one sentence naming the camera: an unknown key, a duplicate or unusable name,
a missing source, a value of the wrong type. The camera API (add, remove, pause, resume) rewrites the file atomically
(a temporary file renamed into place), so a restart runs the line as it was left; comments are not kept. YAML needs
pyyaml (`pip install pyyaml`); JSON needs nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write_bytes, dumps_strict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Names a camera cannot take: they are files, folders or routes of the line's own (OUT/spool, /api, /static).
RESERVED = {"overlays", "spool", "api", "static", "cam", "metrics", "healthz", "readyz"}
TOP_KEYS = {"cameras", "name"}


@dataclass(frozen=True)
class CameraSpec:
    """One camera of the line: its name (its results go to OUT/<name>/), its source and what it overrides."""

    name: str
    source: str
    threshold: float | None = None
    save_overlays: bool | None = None
    save_video: str | None = None
    keep: tuple[str, ...] | None = None
    max_frames: int | None = None
    model: str | None = None  # another model for this camera (cameras sharing a model share its batches)
    paused: bool = False

    def to_dict(self) -> dict:
        """The camera as the line file holds it: the name, the source and only what is set."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k not in ("name", "source", "paused")}
        if "keep" in out:
            out["keep"] = list(out["keep"])
        return {"name": self.name, "source": self.source, **out, **({"paused": True} if self.paused else {})}


KEYS = {f.name for f in fields(CameraSpec)}
_TYPES = {
    "threshold": (int, float),
    "save_overlays": (bool,),
    "save_video": (str,),
    "max_frames": (int,),
    "model": (str,),
    "paused": (bool,),
}


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name.lower() in RESERVED:
        raise UserError(
            f"{where}: camera name {name!r} cannot be used; give 1-64 letters, digits, '_', '-' or '.', starting with "
            f"a letter or digit, and none of {', '.join(sorted(RESERVED))}"
        )
    return name


def camera_from_dict(data: object, where: str) -> CameraSpec:
    """One camera from a line file entry or an API request; refuses with a sentence naming the camera."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: a camera is a mapping with name and source, not {type(data).__name__}")
    name = check_name(data.get("name"), where)
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UserError(
            f"{where}: camera {name!r} has an unknown key {unknown[0]!r}; the keys are {', '.join(sorted(KEYS))}"
        )
    source = data.get("source")
    if not isinstance(source, str | int) or isinstance(source, bool) or not str(source).strip():
        raise UserError(f"{where}: camera {name!r} has no source; give source: a file, folder, video, camera or URL")
    values: dict = {"name": name, "source": str(source).strip()}
    for key, types in _TYPES.items():
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise UserError(f"{where}: camera {name!r}: {key} {value!r} is not a {types[0].__name__}")
        values[key] = float(value) if key == "threshold" else value
    if values.get("max_frames") is not None and values["max_frames"] < 1:
        raise UserError(f"{where}: camera {name!r}: max_frames must be at least 1")
    keep = data.get("keep")
    if keep is not None:
        keep = [keep] if isinstance(keep, str) else keep
        if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
            raise UserError(f"{where}: camera {name!r}: keep is an age or a size ('30d', '20GB') or a list of them")
        values["keep"] = tuple(keep)
    return CameraSpec(**values)


def parse_source_args(sources: tuple[str, ...] | list[str]) -> list[CameraSpec]:
    """`--source NAME=SOURCE` (repeatable). A source without a name is named cam1, cam2, ... by its position; a URL's
    own '=' (a query string) is not taken for a name: only a valid name before the first '=' is one."""
    cameras = []
    for i, text in enumerate(sources, 1):
        name, sep, rest = text.partition("=")
        if sep and NAME_RE.match(name):
            cameras.append(camera_from_dict({"name": name, "source": rest}, f"--source {text}"))
        else:
            cameras.append(camera_from_dict({"name": f"cam{i}", "source": text}, f"--source {text}"))
    check_unique(cameras, "--source")
    return cameras


def is_named(text: str) -> bool:
    """`--source NAME=SOURCE` rather than a plain source."""
    name, sep, _ = text.partition("=")
    return bool(sep) and bool(NAME_RE.match(name))


def is_line_file(text: str | None) -> bool:
    """`--line` names a line file (.yaml, .yml, .json) rather than the line's name for sink messages."""
    return text is not None and Path(text).suffix.lower() in (".yaml", ".yml", ".json")


def check_unique(cameras: list[CameraSpec], where: str) -> None:
    seen: set[str] = set()
    for cam in cameras:
        if cam.name.lower() in seen:  # OUT/<name> must be one folder on a case-insensitive disk too
            raise UserError(f"{where}: camera name {cam.name!r} is given twice; give every camera its own name")
        seen.add(cam.name.lower())


def _yaml():
    try:
        import yaml
    except ImportError:
        raise UserError("a YAML line file needs pyyaml (pip install pyyaml); or write the line file as .json") from None
    return yaml


def load_line(path: Path) -> tuple[str | None, list[CameraSpec]]:
    """(line name, cameras) from a .yaml/.yml/.json line file; every mistake is one sentence naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise UserError(f"--line {path}: give a .yaml, .yml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"--line {path}: cannot read it ({exc.strerror or exc}); give a .yaml or .json line file"
        ) from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"--line {path} is not valid JSON ({exc}); fix the file") from None
    else:
        yaml = _yaml()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"--line {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"--line {path}: the file holds {type(data).__name__}; write a mapping with a cameras list")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise UserError(f"--line {path}: unknown key {unknown[0]!r}; a line file has cameras (and an optional name)")
    entries = data.get("cameras")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--line {path}: cameras must be a non-empty list of {{name, source}} entries")
    cameras = [camera_from_dict(entry, f"--line {path}") for entry in entries]
    check_unique(cameras, f"--line {path}")
    name = data.get("name")
    return (str(name) if name is not None else None), cameras


def save_line(path: Path, name: str | None, cameras: list[CameraSpec]) -> None:
    """Write the line file atomically (renamed into place: a crash leaves the old file or the new one, whole)."""
    data = {**({"name": name} if name else {}), "cameras": [cam.to_dict() for cam in cameras]}
    path = Path(path)
    if path.suffix.lower() == ".json":
        body = dumps_strict(data, indent=2) + "\n"
    else:
        body = _yaml().safe_dump(data, sort_keys=False, default_flow_style=None)
    atomic_write_bytes(path, body.encode("utf-8"))
