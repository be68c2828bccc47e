"""`python -m bench.gpucheck --out DIR`: one bounded pass over everything that needs a real GPU.

Parts, in order, each under its own time cap (bench/gpucheck/parts.py), most in a worker
subprocess (bench/gpucheck/worker.py) that is killed at its cap so one hang cannot eat the rest:

  smoke       versions, device, one tiny offload step (a broken environment shows at once)
  cuda-tests  `pytest -m cuda` in a subprocess, per-test timeout, counts and failing names
  link        our bandwidth probe on the pinned pool against plain torch copies, GB/s each way
  race        delayed side streams and a delayed compute stream: gradients bitwise equal to plain,
              and a deliberately broken backend that the same delays must catch
  suite       the bench's GPU preset for every contender, gradients judged against a measured
              plain-vs-plain noise floor (GPU kernels are not run-to-run deterministic)
  pcie        NVML's PCIe byte counters against the runtime's own byte counts

It writes `gpucheck.json` and `gpucheck.md` under DIR (logs under DIR/logs), prints what failed,
and exits 1 if any part failed. `--dry-run` walks every part's set-up without a device.
"""
