"""The smoke part: versions, the device, and one tiny offload step, so a broken environment is
known within seconds, before any long part starts."""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import platform
from typing import Any

import torch

from ..contenders import Hybrid, Plain
from ..measure import check_pass, compare_grads
from ..presets import PRESETS
from ..suite import runtime_settings
from .config import CheckConfig
from .outcome import Finding
from .seams import nvml_status

TITLE = "versions, device, one tiny offload step"
PRESET = "quick"  # the bench's smoke workload: a 2-block GPT, 4 x 64 tokens, float32


def _contenders() -> list:
    return [Plain(), Hybrid("offload", runtime_settings(PRESETS[PRESET]))]


def plan(cfg: CheckConfig) -> dict:
    """What the smoke part checks (nothing here touches a device)."""
    return dict(preset=PRESET, contenders=[c.name for c in _contenders()],
                checks=["torch, CUDA, cuDNN, NVML driver and nvidia-ml-py versions", "device name and memory",
                        "one offload step: bytes moved > 0, gradients bitwise equal to plain's"])


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver version through NVML, or None."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # no library, no driver: the NVML status below says why
        return None


def versions() -> dict[str, Any]:
    """Software versions and what the CUDA runtime sees; starts CUDA only if it is available."""
    nvml_ok, nvml_reason = nvml_status()
    figs: dict[str, Any] = dict(
        python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        nvidia_ml_py=_package_version("nvidia-ml-py"), pytest=_package_version("pytest"),
        pytest_timeout=_package_version("pytest-timeout"), driver=_driver_version(),
        nvml_ok=nvml_ok, nvml_reason=nvml_reason, cuda_available=torch.cuda.is_available())
    if figs["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        figs.update(device_count=torch.cuda.device_count(), device_name=props.name,
                    capability=f"{props.major}.{props.minor}", device_memory_bytes=props.total_memory)
    return figs


def tiny_step(device: torch.device) -> dict[str, Any]:
    """One measured step of the quick preset under plain and under policy='offload'."""
    preset = PRESETS[PRESET]
    base = preset.build(device)
    batch = preset.batch_for(device)
    checks = {}
    for c in _contenders():
        att = c.attach(copy.deepcopy(base), preset.blocks)
        checks[c.name] = check_pass(att, batch, device)
        att.close()
    bitwise, diff = compare_grads(checks["plain"].grads, checks["offload"].grads)
    rep = checks["offload"].report
    return dict(offloaded_bytes=rep.get("offloaded_bytes"), backend=rep.get("backend"), bitwise=bitwise,
                max_abs_diff=diff, loss=checks["offload"].loss)


def run(cfg: CheckConfig, cap_s: float) -> Finding:
    figs = versions()
    problems = []
    if cfg.on_cuda and not figs["cuda_available"]:
        problems.append(f"CUDA is not available (torch {figs['torch']}, built for CUDA {figs['torch_cuda']})")
        return Finding(problems[0], figs, problems)
    step = tiny_step(torch.device(cfg.device))
    figs["step"] = step
    if not step["offloaded_bytes"]:
        problems.append("the tiny offload step moved no bytes")
    if not step["bitwise"]:
        problems.append(f"the tiny offload step's gradients differ from plain's by {step['max_abs_diff']:.3g}")
    where = figs.get("device_name", cfg.device)
    summary = (f"{where}, torch {figs['torch']} (CUDA {figs['torch_cuda']}), driver {figs['driver']}; "
               f"offload step {'bitwise' if step['bitwise'] else 'NOT bitwise'}, "
               f"{(step['offloaded_bytes'] or 0) / 2**20:.1f} MiB moved")
    return Finding(summary, figs, problems)


def markdown(figures: dict) -> str:
    rows = [f"| {k} | {v} |" for k, v in figures.items() if k != "step"]
    step = figures.get("step")
    if step:
        rows += [f"| step.{k} | {v} |" for k, v in step.items()]
    return "\n".join(["| figure | value |", "|---|---|", *rows])
