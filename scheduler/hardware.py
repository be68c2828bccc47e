"""Hardware presets: the link and compute figures the cost model and `synth` read.

Units: bytes, seconds, bytes per second, FLOP per second. Figures come from vendor spec sheets
or from the measured ranges in DESIGN.md §5; each preset says which. A measured `Profile`
always beats a preset: `Hardware.from_profile` takes the link the runtime actually measured.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Mapping

from .profile import Profile

GB = 1e9  # decimal gigabyte, as vendors and bandwidth tools count
GiB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    """One accelerator and its host link.

    `peak_flops` is the dense bf16 tensor-core peak (no sparsity); `mfu` is the share of it a
    transformer step is assumed to reach, so achieved FLOP/s = peak_flops * mfu. A zero
    `peak_flops` means unknown (a hardware built from a profile, where times are measured).
    """

    name: str
    bw_d2h: float  # device-to-host copy bandwidth into pinned memory, bytes/s
    bw_h2d: float  # host-to-device copy bandwidth from pinned memory, bytes/s
    transfer_latency_s: float = 10e-6  # fixed cost per copy (launch + DMA setup), seconds
    peak_flops: float = 0.0  # dense bf16 tensor-core peak, FLOP/s
    mfu: float = 0.4  # assumed model FLOP utilisation, fraction of peak_flops
    hbm_bytes: int = 0  # device memory capacity, bytes

    def __post_init__(self) -> None:
        for name in ("bw_d2h", "bw_h2d"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Hardware.{name} must be > 0 bytes/s, got {value!r}")
        if self.transfer_latency_s < 0:
            raise ValueError(
                f"Hardware.transfer_latency_s must be >= 0, got {self.transfer_latency_s!r}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"Hardware.mfu must be in (0, 1], got {self.mfu!r}")

    @property
    def achieved_flops(self) -> float:
        """FLOP/s a step is assumed to reach: peak_flops * mfu."""
        return self.peak_flops * self.mfu

    @classmethod
    def from_profile(cls, profile: Profile, base: Hardware | None = None) -> Hardware:
        """The link measured in `profile`; compute and HBM figures from `base` when given."""
        compute = {} if base is None else {
            "peak_flops": base.peak_flops, "mfu": base.mfu, "hbm_bytes": base.hbm_bytes}
        return cls(name="measured" if base is None else f"{base.name} (measured link)",
                   bw_d2h=profile.bw_d2h, bw_h2d=profile.bw_h2d,
                   transfer_latency_s=profile.transfer_latency_s, **compute)


# PCIe Gen5 x16: 63 GB/s per direction in theory, ~50-56 GB/s measured on pinned memory
# (DESIGN.md §5, "physical limits"); we take the middle of the measured range.
_PCIE_GEN5 = 53 * GB
# PCIe Gen4 x16: 31.5 GB/s per direction in theory; ~25 GB/s is the usual pinned-memory
# measurement (the figure the project brief gives for A100 PCIe).
_PCIE_GEN4 = 25 * GB
# GH200 NVLink-C2C: 450 GB/s per direction in theory (NVIDIA Grace Hopper Superchip
# architecture whitepaper, 2023). DESIGN.md §5 reports H2D ~2.4x D2H on it; we assume a
# D2H of 160 GB/s and derive H2D = 2.4 x 160 = 384 GB/s. Replace with a measured profile.
_C2C_D2H = 160 * GB
_C2C_H2D = 2.4 * _C2C_D2H

_PRESETS = {
    hw.name: hw
    for hw in (
        # H100 PCIe datasheet: 756 TFLOPS bf16 dense (1,513 with sparsity), 80 GB HBM2e.
        Hardware("h100-pcie", bw_d2h=_PCIE_GEN5, bw_h2d=_PCIE_GEN5,
                 peak_flops=756e12, mfu=0.4, hbm_bytes=80 * GB),
        # H200 SXM datasheet: 989 TFLOPS bf16 dense (1,979 with sparsity), 141 GB HBM3e,
        # 4.8 TB/s; its host link is PCIe Gen5 x16.
        Hardware("h200", bw_d2h=_PCIE_GEN5, bw_h2d=_PCIE_GEN5,
                 peak_flops=989e12, mfu=0.4, hbm_bytes=141 * GB),
        # GH200 datasheet: Hopper GPU at 989 TFLOPS bf16 dense, 96 GB HBM3; NVLink-C2C link.
        Hardware("gh200", bw_d2h=_C2C_D2H, bw_h2d=_C2C_H2D,
                 peak_flops=989e12, mfu=0.4, hbm_bytes=96 * GB),
        # A100 PCIe 80GB datasheet: 312 TFLOPS bf16 dense (624 with sparsity); PCIe Gen4 x16.
        Hardware("a100-pcie", bw_d2h=_PCIE_GEN4, bw_h2d=_PCIE_GEN4,
                 peak_flops=312e12, mfu=0.4, hbm_bytes=80 * GB),
    )
}

#: Named presets, read-only. The MFU of 0.4 is an assumption, not a measurement.
PRESETS: Mapping[str, Hardware] = types.MappingProxyType(_PRESETS)


def get_hardware(name: str) -> Hardware:
    """The preset called `name`; `ValueError` lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"get_hardware: unknown hardware {name!r}; expected one of {sorted(PRESETS)}") from None

