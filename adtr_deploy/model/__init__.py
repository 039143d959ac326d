"""The ADTR model (torch): backbones, the reconstruction transformer, presets and the checkpoint format."""

from adtr_deploy.model.adtr import ADTR, build_adtr
from adtr_deploy.model.config import PRESETS, ADTRConfig, get_preset

__all__ = ["ADTR", "ADTRConfig", "PRESETS", "build_adtr", "get_preset"]
