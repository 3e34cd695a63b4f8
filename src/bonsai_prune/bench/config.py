"""What one bench run measures, and how much of it (``--quick`` or the full set)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = True
    model: str = "default"
    n_masks: int = 8  # at least one full group of the default masks_per_forward
    calib_samples: int = 4
    decode_tokens: int = 32
    seed: int = 0
    dtype: str = "auto"  # of the project's path; the reference loop is always fp32

    @classmethod
    def make(cls, quick: bool, model: str = "default", dtype: str = "auto") -> BenchConfig:
        if quick:
            return cls(quick, model, dtype=dtype)
        return cls(False, model, 16, 8, 128, dtype=dtype)
