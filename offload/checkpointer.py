"""`HybridCheckpointer`: the public entry point. `with hc:` wraps one forward pass."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Union

import torch
from torch import nn

from scheduler.plan import Action

from .core.attach import Attachment
from .core.budget import Budget, local_world_size, parse_budget
from .core.errors import OffloadError, warn
from .core.hooks import ForwardPass, param_storage_ids
from .core.policy import FixedPolicy, RegionSite, TensorSite, resolve_policy
from .core.regions import Region, RegionHooks, RegionsArg, compiled_model_error, resolve_regions
from .core.runtime import Runtime, Settings, device_available
from .core.selective import resolve_op_policy
from .core.verify import OpNames, Verifier, Verify, resolve_verify
from .observe.hostmem import available_host_bytes
from .observe.report import Report
from .observe.stats import StepStats
from .observe.units import fmt_bytes
from .transfer.backend import TransferBackend
from .transfer.emulated import EmulatedBackend
from .transfer.hostpool import HostPool

if TYPE_CHECKING:
    from .observe.monitor import Monitor

log = logging.getLogger(__name__)

PolicyArg = Union[str, Action, Callable[[Union[RegionSite, TensorSite]], Union[Action, None]]]
HOST_SHARE = 0.5  # default host budget: this share of available host memory, split among local ranks


class HybridCheckpointer:
    """Keeps, offloads or recomputes every activation autograd saves inside `with hc:`.

    Args:
        model: the model (used to find regions and the parameters never to move); optional.
        policy: "auto" (the scheduler plans under the budgets), "keep", "offload", "recompute",
            an `offload.Action`, or a callable given a `RegionSite` per region call and a
            `TensorSite` per saved tensor, returning an `Action` (or None for the default).
        device_budget: bytes that saved activations may occupy on the device at once ("auto"
            plans under it; when copies lag the link, the forward waits for them rather than
            pass it); int bytes or "12GiB", "512MB", "40%" (of free device memory).
            None: free device memory less 10%.
        host_budget: pinned host bytes the runtime may hold, same forms ("40%" of available
            host memory). None: half the available host memory (cgroup-aware), divided among
            the ranks on this host (LOCAL_WORLD_SIZE). Offloads beyond it fall back to keep.
        regions: "auto" (every repeated stack of blocks in `model`: a decoder's layers, or a T5's
            encoder and decoder blocks), a module list or any iterable of modules, a module list's
            name in `model` ("model.layers"), a block class or a set of them (`LlamaDecoderLayer`,
            as FSDP's wrap policy takes), or None (no recompute: per-tensor keep/offload only).
            Regions must be submodules of `model`.
        backend: "auto" (CUDA when the model is on a GPU, else the CPU emulation), or a
            `TransferBackend` instance (e.g. `EmulatedBackend(d2h_delay_s=0.01)` in tests).
        min_offload_bytes: storages smaller than this are never offloaded (None: the backend's
            default, 512 KiB, about where a copy's fixed cost equals its transfer time).
        lookahead: regions ahead of backward at which reloads are issued (None: the policy's
            choice, 1 for fixed policies; 0: reload on demand at unpack).
        keep_last: region calls at the end of forward kept resident under "offload" (backward
            needs them at once).
        slab_bytes: host pool slab size (a power of two).
        op_policy: selective recompute inside recomputed regions, in PyTorch's forms: a checkpoint
            policy function `fn(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy`,
            or a list of ops whose outputs to save (e.g. `[torch.ops.aten.mm.default]`); saved op
            outputs are reused by the replay, CPU_OFFLOAD ones go through our pool. The policy is
            asked about the ops torch.utils.checkpoint asks it about, in the same order, and
            again during the replay (`ctx.is_recompute=True`) only where the installed PyTorch
            does that too.
        monitor: an `offload.Monitor` whose NVML/psutil samples the report and trace include,
            or True to start one on the first forward (stopped by `close()`).
        verify: True compares every reloaded or recomputed tensor with a reference taken when it
            was saved and counts mismatches in `report().verify`; "strict" raises `OffloadError`
            at the first one; an `offload.Verify` sets the tolerance for recomputed tensors and
            the host bytes of reference copies (checksums beyond). A debugging mode: it copies
            each such tensor to the host at save and at unpack.
        granularity: what policy="auto" may recompute: "op" (whole regions, or regions that
            store the outputs of their dearest ops and replay the rest: selective recompute
            chosen from an op profile of the warm-up step) or "block" (whole regions only).

    Memory guarantee (fixed policies): saved activations on the device are at most
    kept + in-flight D2H + reloaded-and-not-yet-released + one recomputed region; pinned host
    bytes never exceed `host_budget`.
    """

    def __init__(self, model: nn.Module | None = None, *, policy: PolicyArg = "auto",
                 device_budget: Budget = None, host_budget: Budget = None,
                 regions: RegionsArg = "auto",
                 backend: Union[str, TransferBackend] = "auto", min_offload_bytes: int | None = None,
                 lookahead: int | None = None, keep_last: int = 1, slab_bytes: int = 64 << 20,
                 monitor: "Monitor | bool" = False, op_policy: Union[Callable, list, None] = None,
                 verify: "bool | str | Verify" = False, granularity: str = "op"):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"HybridCheckpointer(model=...): expected an nn.Module or None, got {type(model).__name__}")
        parsed_op_policy = resolve_op_policy(op_policy)
        if granularity not in ("op", "block"):
            raise ValueError(f"HybridCheckpointer(granularity={granularity!r}): expected 'op' (auto may "
                             f"recompute regions selectively, op by op) or 'block' (whole regions only)")
        resolved = resolve_regions(model, regions)
        fixed = resolve_policy(policy)
        if isinstance(fixed, FixedPolicy) and fixed.action is Action.RECOMPUTE and not resolved:
            raise ValueError(f"HybridCheckpointer(policy={policy!r}): recompute needs regions; pass model= "
                             f"with repeated blocks, or regions=[...]")
        for name, value in (("keep_last", keep_last), ("lookahead", lookahead), ("min_offload_bytes", min_offload_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"HybridCheckpointer({name}={value!r}): expected an int >= 0")
        if not isinstance(monitor, bool) and not hasattr(monitor, "samples"):
            raise TypeError(f"HybridCheckpointer(monitor={monitor!r}): expected an offload.Monitor or a bool")
        backend = _make_backend(backend, _model_device(model, resolved))
        device_budget = parse_budget("device_budget", device_budget, lambda: device_available(backend.device))
        host_budget = parse_budget("host_budget", host_budget, available_host_bytes)
        if host_budget is None:
            host_budget = int(available_host_bytes() * HOST_SHARE / local_world_size())
        settings = Settings(
            model=model, regions=resolved, device_budget=device_budget, host_budget=host_budget,
            min_offload_bytes=backend.default_min_offload_bytes if min_offload_bytes is None else min_offload_bytes,
            derive_threshold=min_offload_bytes is None, keep_last=keep_last, lookahead=lookahead,
            op_policy=parsed_op_policy, verify=resolve_verify(verify), op_level=granularity == "op",
            policy_name=(policy if isinstance(policy, str) else policy.value if isinstance(policy, Action)
                         else getattr(policy, "__name__", "callable")))
        self._runtime = Runtime(settings, backend, HostPool(backend, host_budget, slab_bytes))
        if fixed is None:
            from .auto.policy import AutoPolicy
            fixed = AutoPolicy(self._runtime)
        self._runtime.policy = fixed
        self._active: ForwardPass | None = None
        self._model_called = False  # this forward called the model (or an attached module)
        self._plain = False  # the active `with hc:` runs with grad off: plain PyTorch
        self._warned_hf = False
        self.monitor = monitor if not isinstance(monitor, bool) else None
        self._own_monitor = monitor is True

    # -- the context manager -------------------------------------------------------------------
    def __enter__(self) -> "HybridCheckpointer":
        if self._active is not None or self._plain:
            raise OffloadError("HybridCheckpointer: `with hc:` is already active (nested or concurrent "
                               "forwards under one checkpointer are not supported); use one `with` per forward")
        if not torch.is_grad_enabled():  # no_grad, inference_mode: autograd saves nothing
            self._plain = True
            return self
        rt = self._runtime
        self._check_foreign_checkpointing()
        if self._own_monitor and self.monitor is None:
            from .observe.monitor import Monitor
            self.monitor = Monitor(self.device).start()
        # Rule 6: refreshed every forward (FSDP swaps parameters)
        params = param_storage_ids(self.model) if self.model is not None else set()
        fp = ForwardPass(rt, params)
        rt.policy.begin_forward(fp)
        region_hooks = RegionHooks(self.regions, fp.enter_region, fp.exit_region)
        self._model_called = False
        if self.model is not None:  # the input signature, before any segment is planned
            region_hooks.add_pre_hook(self.model, lambda args, kwargs: self._model_call(self.model, args, kwargs))
        saved_hooks = torch.autograd.graph.saved_tensors_hooks(fp.pack, fp.unpack)
        op_names = OpNames() if rt.settings.verify is not None else None
        try:
            saved_hooks.__enter__()
            if op_names is not None:
                fp.verifier = Verifier(rt.settings.verify, op_names)
                op_names.__enter__()
        except BaseException:
            region_hooks.remove()
            raise
        self._active = fp
        self._region_hooks, self._saved_hooks, self._op_names = region_hooks, saved_hooks, op_names
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._plain:
            self._plain = False
            return
        fp, rt = self._active, self._runtime
        try:  # Rule 9: whatever happened in forward, the hooks come off and the state closes
            if self._op_names is not None:
                self._op_names.__exit__(exc_type, exc, tb)
            self._saved_hooks.__exit__(exc_type, exc, tb)
        finally:
            self._region_hooks.remove()
            self._active = None
            if fp.close(failed=exc_type is not None):  # a forward with grad off leaves no trace
                fp.stats.forwards += 1
                rt.policy.end_forward(fp, failed=exc_type is not None)
        if exc_type is None and self.model is not None and not self._model_called and not fp.region_calls \
                and fp.pack_index:
            raise OffloadError(
                f"HybridCheckpointer: the forward under `with hc:` saved {fp.pack_index} tensors for backward "
                f"but never called the model the checkpointer was built for ({type(self.model).__name__}) nor "
                f"any of its regions, so the runtime could not plan or recompute them. Build the checkpointer "
                f"for the model you call (a copy such as copy.deepcopy(model) is another model), or call "
                f"that model inside `with hc:`")
        never_recomputes = isinstance(rt.policy, FixedPolicy) and rt.policy.action is not Action.RECOMPUTE
        if exc_type is None and fp.compiled_gap and not fp.region_calls and self.regions and not never_recomputes:
            raise OffloadError(compiled_model_error(
                "the model ran compiled as a whole with torch.compile and none of its regions was seen"))

    def _model_call(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        """The model's forward pre-hook while `with hc:` is active: note the call and the input
        signature (before any segment is planned). PyTorch iterates a snapshot of the pre-hooks,
        so when an attachment closes a stale forward in its own pre-hook, this hook, removed
        meanwhile, is still called for that call, and without kwargs."""
        self._model_called = True
        self._runtime.policy.model_inputs(args, kwargs or {})

    def attach(self, module: nn.Module | None = None) -> Attachment:
        """Run every forward of `module` (default: the model) that records autograd under this
        checkpointer, as if each were wrapped in `with hc:`: for training loops you do not write.

            handle = hc.attach(model)      # or: with hc.attach(model): trainer.train()
            trainer.train()
            handle.remove()

        Calls under `torch.no_grad()` or `torch.inference_mode()` (evaluation), and calls while
        the checkpointer is already active (`with hc:`), run as plain PyTorch. An exception in
        forward leaves the runtime as it was (Rule 9). `module` must be the model, a submodule of
        it, or a wrapper around it (DDP, a LightningModule)."""
        module = self.model if module is None else module
        if not isinstance(module, nn.Module):
            raise TypeError(f"HybridCheckpointer.attach({module!r}): expected an nn.Module (or no argument, "
                            f"with a checkpointer built with model=)")
        model = self.model
        if model is not None and not any(m is model for m in module.modules()) \
                and not any(m is module for m in model.modules()):
            raise ValueError(f"HybridCheckpointer.attach({type(module).__name__}): the module is neither the "
                             f"model the checkpointer was built for ({type(model).__name__}), a part of it, nor a "
                             f"wrapper around it; attach the model you train, or build the checkpointer for it")
        # Inert while the runtime is active, and inside a replay (recompute calls blocks again).
        return Attachment(module, self._enter_attached, lambda exc_type: self.__exit__(exc_type, None, None),
                          lambda: self._active is not None or self._runtime.replay_guard.depth > 0)

    def _enter_attached(self, args: tuple, kwargs: dict) -> None:
        """`with hc:` entered from an attached module's pre-hook, which runs before the model's
        own pre-hook is installed: note the call and its inputs here."""
        self.__enter__()
        self._model_call(self.model, args, kwargs)

    def _check_foreign_checkpointing(self) -> None:
        """Hugging Face's own gradient checkpointing recomputes every layer with
        torch.utils.checkpoint; its hooks sit inside ours, so the layers' tensors never reach us.
        Gradients stay correct, but our policy then decides nothing inside the layers: say so."""
        if self._warned_hf or not _hf_checkpointing(self.model):
            return
        self._warned_hf = True
        warn(f"HybridCheckpointer: the model has Hugging Face gradient_checkpointing enabled; it recomputes "
             f"every layer itself, so the runtime sees no tensors inside the layers and policy="
             f"{self.policy_name!r} has no effect there. Call model.gradient_checkpointing_disable() (or "
             f"leave TrainingArguments(gradient_checkpointing=False)) to let the runtime decide.")

    # -- public ----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module | None:
        """The model this checkpointer was built for."""
        return self._runtime.settings.model

    @property
    def regions(self) -> list[Region]:
        """The regions (blocks) found or given; each has `.name` and `.module`."""
        return self._runtime.settings.regions

    @property
    def device(self) -> torch.device:
        """The compute device (the backend's)."""
        return self._runtime.device

    @property
    def device_budget(self) -> int | None:
        """The device budget in bytes as given (None: free device memory less headroom)."""
        return self._runtime.settings.device_budget

    @property
    def host_budget(self) -> int:
        """Pinned host bytes the runtime may hold."""
        return self._runtime.settings.host_budget

    @property
    def min_offload_bytes(self) -> int:
        """Storages smaller than this are never offloaded (policy="auto" derives it from the link)."""
        return self._runtime.settings.min_offload_bytes

    @property
    def keep_last(self) -> int:
        """Region calls at the end of forward kept resident under "offload"."""
        return self._runtime.settings.keep_last

    @property
    def policy_name(self) -> str:
        """The policy as the report names it."""
        return self._runtime.settings.policy_name

    @property
    def stats(self) -> StepStats:
        """Counters of the current step (the one the last forward belongs to)."""
        return self._runtime.finish_step()

    @property
    def plan(self):
        """The scheduler's `Plan` the last forward ran (policy="auto"); None while profiling or
        under a fixed policy."""
        return self._runtime.policy.current_plan()

    @property
    def host_pool(self) -> HostPool:
        """The pinned host pool (exact-byte budget)."""
        return self._runtime.pool

    @property
    def backend(self) -> TransferBackend:
        """The transfer backend (CUDA streams or the CPU emulation)."""
        return self._runtime.backend

    def report(self) -> Report:
        """What moved in the current step and how well it overlapped."""
        rt = self._runtime
        rt.backend.poll()
        return Report.build(rt, self.stats, self.monitor)

    def close(self) -> None:
        """Stop the monitor this checkpointer started and the emulation's worker threads."""
        if self._own_monitor and self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        self._runtime.policy.close()
        self._runtime.backend.close()

    def __repr__(self) -> str:
        device = "auto" if self.device_budget is None else fmt_bytes(self.device_budget)
        return (f"HybridCheckpointer(policy={self.policy_name!r}, regions={len(self.regions)}, "
                f"backend={self.backend.name}, device_budget={device}, host_budget={fmt_bytes(self.host_budget)})")


def _hf_checkpointing(model: nn.Module | None) -> bool:
    """Whether a Hugging Face model, possibly wrapped (DDP/FSDP1 `.module`, torch.compile
    `._orig_mod`), has its own checkpointing on."""
    while model is not None:
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5, 4
            if isinstance(getattr(type(model), name, None), property):
                return bool(getattr(model, name))
        inner = model._modules.get("module") or model._modules.get("_orig_mod")
        model = inner if isinstance(inner, nn.Module) else None
    return False


def _model_device(model: nn.Module | None, regions: list[Region]) -> torch.device | None:
    for mod in ([model] if model is not None else []) + [r.module for r in regions]:
        for p in mod.parameters():
            return p.device
    return None


def _make_backend(backend: "str | TransferBackend", device: torch.device | None) -> TransferBackend:
    """The transfer backend named by the user ("auto": CUDA when the model is on a GPU), checked
    against the device the model's parameters are on."""
    if device is not None and device.type not in ("cpu", "cuda"):
        raise OffloadError(f"HybridCheckpointer(model=...): the model's parameters are on {device}; the runtime "
                           f"runs on 'cuda' (or the CPU emulation). Materialise the model first, e.g. "
                           f"model.to_empty(device='cuda') and load its weights, then build the checkpointer")
    if isinstance(backend, TransferBackend):
        out = backend
    elif backend == "emulated" or (backend == "auto" and (device is None or device.type != "cuda")):
        out = EmulatedBackend()
    elif backend in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise OffloadError(f"HybridCheckpointer(backend={backend!r}): CUDA is not available here (the model "
                               f"is on {device or 'no device'}); use backend='auto' or 'emulated' to run on the CPU")
        from .transfer.cuda import CudaBackend
        out = CudaBackend(device if device is not None and device.type == "cuda" else None)
    else:
        raise ValueError(f"HybridCheckpointer(backend={backend!r}): use 'auto', 'cuda', 'emulated' or a "
                         f"TransferBackend instance")
    if device is not None and device != out.device:
        raise OffloadError(f"HybridCheckpointer(backend={backend!r}): the model is on {device} but the backend "
                           f"runs on {out.device}, so nothing could be moved; move the model there first, or use "
                           f"backend='auto'")
    return out
