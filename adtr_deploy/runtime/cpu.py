"""What the CPU offers for inference: its model name and the instruction-set flags that decide which precision is fast.

Read from /proc/cpuinfo (Linux); elsewhere the model comes from `platform` and the flags are unknown (an empty list and a
note), never guessed. Stdlib only: adtr-run's summary.json and adtr-bench's reports record it with every figure.
"""

from __future__ import annotations

import functools
import platform

# flag in /proc/cpuinfo -> what it gives an inference engine (the ones that decide FP32/BF16/INT8 speed)
INFERENCE_FLAGS: dict[str, str] = {
    "avx2": "AVX2 (256-bit FP32 and int8 products)",
    "fma": "FMA3",
    "avx_vnni": "AVX-VNNI (256-bit int8 dot products)",
    "avx512f": "AVX-512 Foundation",
    "avx512bw": "AVX-512 BW (byte/word ops)",
    "avx512vl": "AVX-512 VL",
    "avx512_vnni": "AVX-512 VNNI (512-bit int8 dot products)",
    "avx512_bf16": "AVX-512 BF16 (bfloat16 dot products)",
    "avx512_fp16": "AVX-512 FP16 (half-precision arithmetic)",
    "amx_tile": "AMX tiles",
    "amx_bf16": "AMX BF16 (bfloat16 matrix tiles)",
    "amx_int8": "AMX INT8 (int8 matrix tiles)",
}


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str | None, tuple[str, ...] | None]:
    """(model name, all flags) from /proc/cpuinfo; None where it cannot be read."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:  # x86: flags; ARM: Features
                    flags = tuple(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    """The CPU's marketing name, e.g. 'AMD EPYC 9R14 96-Core Processor'."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def cpu_info() -> dict:
    """The CPU's model, the inference-relevant flags it has, and what they allow (JSON-ready)."""
    _, flags = _cpuinfo()
    if flags is None:
        return {
            "model": cpu_model(),
            "flags": [],
            "flags_known": False,
            "note": "no /proc/cpuinfo here: instruction-set flags unknown",
        }
    have = [f for f in INFERENCE_FLAGS if f in flags]
    return {
        "model": cpu_model(),
        "flags": have,
        "flags_known": True,
        "bf16": any(f in have for f in ("avx512_bf16", "amx_bf16")),
        "int8_dot": any(f in have for f in ("avx512_vnni", "avx_vnni", "amx_int8")),
        "amx": "amx_tile" in have,
    }


def describe_flags(info: dict) -> str:
    """One line for reports: 'AMD EPYC ... (avx2, avx512f, avx512_vnni, avx512_bf16)'."""
    flags = ", ".join(info.get("flags") or []) if info.get("flags_known", True) else "flags unknown"
    return f"{info.get('model')} ({flags or 'none of ' + ', '.join(INFERENCE_FLAGS)})"
