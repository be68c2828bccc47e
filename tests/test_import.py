"""Importing the packages has no side effects: no CUDA, no NVML, no torch in scheduler."""
import subprocess
import sys

CHECK = r"""
import sys
import offload, scheduler
import torch
assert not torch.cuda.is_initialized(), "importing offload initialised CUDA"
assert "torch.distributed.tensor" not in sys.modules, "importing offload imported DTensor"
nvml = sys.modules.get("pynvml")
if nvml is not None:
    lib = getattr(nvml, "nvmlLib", None)
    assert lib is None, "importing offload loaded the NVML library"
import logging
assert not logging.getLogger().handlers, "the library configured the root logger"
for framework in ("transformers", "accelerate", "lightning", "pytorch_lightning"):
    assert framework not in sys.modules, f"importing offload imported {framework}"
assert "offload.integrations" not in sys.modules
print("ok")
"""


def test_import_starts_nothing():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_scheduler_needs_no_torch():
    code = "import sys, scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
