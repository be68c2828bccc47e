"""The offload internals the GPU check reaches past the public API for, imported here only, so a
move of offload's modules touches this one file."""
from offload.bandwidth import PROBE_BYTES, UNMEASURED, measure_link  # noqa: F401
from offload.cudastreams import CudaBackend  # noqa: F401
from offload.nvml import nvml_status  # noqa: F401
