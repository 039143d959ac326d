"""The ADTR model (torch): backbones, the reconstruction transformer, presets and the checkpoint format.

`adtr_deploy.model.config` is torch-free (CLI help texts read the presets); the torch modules load on first use.
"""

from adtr_deploy.model.config import PRESETS, ADTRConfig, get_preset

__all__ = ["ADTR", "ADTRConfig", "PRESETS", "get_preset"]


def __getattr__(name: str):
    if name == "ADTR":
        from adtr_deploy.model import adtr

        return getattr(adtr, name)
    raise AttributeError(f"module 'adtr_deploy.model' has no attribute {name!r}")
