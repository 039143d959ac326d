"""ModelSpec: everything a runtime needs to know about an exported model (stdlib only).

The spec travels with every artifact: as `model.json` beside it, in ONNX `metadata_props`, in TorchScript `_extra_files`.
Score normalization and the threshold live here, so a user can change them without re-exporting.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adtr_deploy.errors import UserError
from adtr_deploy.fileio import atomic_write_text

SPEC_VERSION = 2  # the newest this package reads; 2 = a spec that carries tiling (older runtimes must refuse it)
UNTILED_SPEC_VERSION = 1  # untiled specs are still written as version 1, so older runtimes keep reading them
SPEC_FILENAME = "model.json"
METADATA_KEY = "adtr_spec"  # key in ONNX metadata_props and the TorchScript _extra_files name prefix


class SpecError(UserError):
    """A model spec is missing, malformed or from an unsupported version."""


@dataclass(frozen=True)
class Calibration:
    """Statistics of held-out good images; they turn raw scores into normalized ones and give a default threshold.

    normalized = 0.5 * (raw - mean) / (threshold - mean), clipped to [0, 1]: the good mean maps to 0, the threshold to 0.5.
    """

    score_mean: float = 0.0
    score_std: float = 1.0
    score_max: float = 1.0
    threshold: float = 1.0  # image-score threshold: score > threshold -> anomaly
    map_mean: float = 0.0
    map_std: float = 1.0
    map_threshold: float = 1.0  # pixel threshold for masks and overlays
    num_images: int = 0
    method: str = "uncalibrated"
    margin: float = 0.0  # how far `threshold` was lifted above the good-image rule (calibration.DEFECT_MARGIN)


@dataclass(frozen=True)
class ModelSpec:
    """The contract between an exported graph and the runtime that feeds it."""

    input_size: tuple[int, int] = (224, 224)  # (H, W)
    input_name: str = "image"
    input_layout: str = "NHWC"  # uint8 RGB batch, normalization happens inside the graph
    input_dtype: str = "uint8"
    color: str = "RGB"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # applied inside the graph, on [0, 1] pixels
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    output_names: tuple[str, str] = ("anomaly_map", "score")
    calibration: Calibration = field(default_factory=Calibration)
    preset: str = "lite0"
    backbone: str = "efficientnet-lite0"
    format: str = "pytorch"  # pytorch | torchscript | onnx | tensorrt
    precision: str = "fp32"
    spec_version: int = UNTILED_SPEC_VERSION
    package_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # versions, sha256, engine details, training info
    # Tiling at native resolution (adtr_deploy/tiling.py `Tiling.to_dict`): None = whole images resized to input_size.
    tiling: dict[str, Any] | None = None

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    def replace(self, **changes: Any) -> ModelSpec:
        if "calibration" in changes and isinstance(changes["calibration"], dict):
            changes["calibration"] = Calibration(**changes["calibration"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.tiling is not None:  # an older runtime would ignore the field and run the model untiled
            data["spec_version"] = max(SPEC_VERSION, self.spec_version)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)  # the checks keep it finite

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "The model spec") -> ModelSpec:
        """`origin` names where the spec came from in every refusal (the model.json path when loaded from a file)."""
        if not isinstance(data, dict):
            raise SpecError(f"{origin} is not a JSON object; re-export the model with adtr-export.")
        version = data.get("spec_version", 0)
        if not isinstance(version, int):
            raise SpecError(
                f"{origin}: spec_version {version!r} is not a number; re-export the model with adtr-export."
            )
        if version > SPEC_VERSION:
            raise SpecError(
                f"{origin} has version {version}, newer than this adtr-deploy supports ({SPEC_VERSION}); "
                "upgrade adtr-deploy."
            )
        _check_calibration(data.get("calibration"), origin)
        try:
            known = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in data.items() if k in known}
            cal_fields = {f.name for f in dataclasses.fields(Calibration)}
            kwargs["calibration"] = Calibration(
                **{k: v for k, v in dict(data.get("calibration") or {}).items() if k in cal_fields}
            )
            for key in ("input_size", "mean", "std", "output_names"):
                if key in kwargs:
                    kwargs[key] = tuple(kwargs[key])
            spec = cls(**kwargs)
            _check_types(spec)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{origin} has a malformed field ({exc}); re-export the model with adtr-export.") from None
        return spec

    @classmethod
    def from_json(cls, text: str, origin: str = "The model spec") -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{origin} is not valid JSON ({exc}); re-export the model with adtr-export.") from None
        return cls.from_dict(data, origin)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON atomically (temporary file, then rename)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        if not path.is_file():
            raise SpecError(
                f"No model spec at {path}; export the model with adtr-export, which writes it beside the model."
            )
        return cls.from_json(path.read_text(), origin=str(path))


_CALIBRATION_NUMBERS = tuple(f.name for f in dataclasses.fields(Calibration) if f.name != "method")
# Added after model.json files were deployed: absent means its default (a calibration from before it: margin 0).
_CALIBRATION_OPTIONAL = ("margin",)


def _check_calibration(cal: Any, origin: str) -> None:
    """Every calibration value present, a finite number, not negative: a NaN threshold would pass every part and make
    results.jsonl and summary.json unreadable for strict JSON readers; a negative deviation or count is no statistic.
    (Scores are reconstruction errors, so their means and thresholds are not negative either.)"""
    if not isinstance(cal, dict):
        raise SpecError(
            f"{origin} has no calibration object; re-export the model with adtr-export, which writes one (its "
            '"method" says "uncalibrated" when there were no calibration images).'
        )
    missing = [name for name in _CALIBRATION_NUMBERS if name not in cal and name not in _CALIBRATION_OPTIONAL]
    if missing:
        raise SpecError(
            f"{origin} lacks calibration.{', calibration.'.join(missing)}; re-export the model with adtr-export or "
            "put the value back."
        )
    for name in _CALIBRATION_NUMBERS:
        if name not in cal:
            continue
        value = cal[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue  # a wrong type is refused with the other malformed fields
        if not math.isfinite(value):
            raise SpecError(
                f"{origin}: calibration.{name} is {value}, not a finite number; put a number there (a threshold is a "
                "raw score, e.g. from adtr-eval) or re-export the model with adtr-export."
            )
        if value < 0:
            raise SpecError(
                f"{origin}: calibration.{name} is {value:g}, but it cannot be negative (scores are reconstruction "
                "errors); put a value of 0 or more there, or re-export the model with adtr-export."
            )


def _check_types(spec: ModelSpec) -> None:
    """Fields a runtime computes with must have their types: a hand-edited model.json fails here, not mid-run."""
    h, w = spec.input_size
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"input_size {list(spec.input_size)} is not two positive integers")
    for name, value in dataclasses.asdict(spec.calibration).items():
        if name != "method" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"calibration.{name} is {value!r}, not a number")
    if not isinstance(spec.extra, dict):
        raise ValueError("extra is not an object")
    if spec.tiling is not None and not isinstance(spec.tiling, dict):
        raise ValueError("tiling is not an object or null")


def spec_path_for(model_path: str | Path) -> Path:
    """The `model.json` that sits beside an exported artifact."""
    return Path(model_path).with_name(SPEC_FILENAME)
