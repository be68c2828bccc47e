"""The main bench: every contender on the same weights and batch; memory, gradients, then time.

Order of work (each contender on its own deep copy of one seeded model):
  1. memory-and-gradients pass per fixed contender (one warm-up step, then one step under
     `offload.PeakMemory`, gradients kept and compared bitwise with plain's);
  2. the `policy="auto"` contenders, at device budgets that are fractions of the keep policy's
     measured peak, each first run until its plan is in force (which also detects whether "auto"
     is implemented yet), then the same pass;
  3. timing: all contenders round-robin, warm-up rounds then timed rounds.
"""
from __future__ import annotations

import copy
import logging
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from .contenders import AUTO_MISSING, Attached, Contender, HybridAuto, RuntimeSettings, baselines, fixed_policies
from .measure import Batch, Check, Timing, check_pass, compare_grads, step, time_interleaved
from .presets import Preset
from .progress import Progress
from .results import ContenderResult, Skipped

log = logging.getLogger(__name__)

# The main bench runs policy="auto" at op level and, at the same budgets, with whole blocks only.
AUTO_GRANULARITIES = ("op", "block")


@dataclass(frozen=True)
class SuiteConfig:
    """How the main bench runs."""

    preset: Preset
    device: torch.device
    warmup: int  # untimed rounds before the timed ones
    repeats: int  # timed rounds (one step per contender each)
    budgets: tuple[float, ...]  # policy="auto" device budgets, as fractions of keep's peak bytes
    progress: bool = True


def runtime_settings(preset: Preset) -> RuntimeSettings:
    """The HybridCheckpointer arguments every contender of ours gets for `preset`."""
    return RuntimeSettings(min_offload_bytes=preset.min_offload_bytes, host_budget=preset.host_budget)


def auto_contenders(fractions: tuple[float, ...], reference_bytes: int, settings: RuntimeSettings,
                    of: str = "", granularities: tuple[str, ...] = ("op",)) -> list[HybridAuto]:
    """policy="auto" at each fraction of `reference_bytes` and each granularity, named by the
    percentage ("auto@30%", "auto-block@30%", or "auto@30%cap" with of="cap")."""
    return [HybridAuto(int(f * reference_bytes), f"{f:.0%}{of}", settings, g)
            for f in fractions for g in granularities]


def attach_auto(contender: HybridAuto, model: nn.Module, blocks: str, batch: Batch) -> Attached | Skipped:
    """Attach `contender` and run its `settle_steps` (so no later measured step includes the
    planning); a Skipped if "auto" is missing (NotImplementedError, ImportError) or fails."""
    try:
        att = contender.attach(model, blocks)
        for _ in range(max(1, contender.settle_steps)):
            step(att, batch)
        return att
    except AUTO_MISSING as e:
        return Skipped(contender.name, f"policy='auto' is not available yet ({type(e).__name__}: {e})")
    except Exception as e:  # a bug in a half-built feature must not hide the other contenders
        log.warning("%s failed; skipping it", contender.name, exc_info=True)
        return Skipped(contender.name, f"failed: {type(e).__name__}: {e}")


def run_suite(cfg: SuiteConfig) -> tuple[dict[str, ContenderResult], list[Skipped]]:
    """Measure every contender; returns results by name (table order) and the skipped ones."""
    preset, device = cfg.preset, cfg.device
    base = preset.build(device)
    batch = preset.batch_for(device)
    settings = runtime_settings(preset)
    contenders: dict[str, Contender] = {c.name: c for c in baselines() + fixed_policies(settings)}
    attached = {name: c.attach(copy.deepcopy(base), preset.blocks) for name, c in contenders.items()}

    checks: dict[str, Check] = {}
    autos = len(cfg.budgets) * len(AUTO_GRANULARITIES)
    with Progress(len(attached) + autos, "memory + gradients", enabled=cfg.progress) as bar:
        for name, att in attached.items():
            checks[name] = check_pass(att, batch, device)
            bar.advance(name)
        skipped = []
        for c in auto_contenders(cfg.budgets, checks["keep"].peak_bytes, settings,
                                 granularities=AUTO_GRANULARITIES):
            att = attach_auto(c, copy.deepcopy(base), preset.blocks, batch)
            if isinstance(att, Skipped):
                log.debug("skipping %s: %s", att.name, att.reason)  # printed with the table
                skipped.append(att)
            else:
                contenders[c.name], attached[c.name] = c, att
                checks[c.name] = check_pass(att, batch, device)
            bar.advance(c.name)

    timings = time_interleaved(attached, batch, device, cfg.warmup, cfg.repeats, cfg.progress)
    results = {name: _result(contenders[name], checks[name], checks["plain"], timings[name], timings["plain"],
                             preset.tokens)
               for name in attached}
    for att in attached.values():
        att.close()
    return results, skipped


def _result(c: Contender, check: Check, plain: Check, timing: Timing, plain_timing: Timing,
            tokens: int) -> ContenderResult:
    match, diff = compare_grads(plain.grads, check.grads)
    rep = check.report
    stall = statistics.median(timing.stall_s) if timing.stall_s else rep.get("stall_s")
    return ContenderResult(
        name=c.name, family=c.family, step_s=timing.median_s, step_s_all=list(timing.seconds),
        step_s_min=min(timing.seconds),
        ratio_to_plain=timing.ratio_to(plain_timing), tokens_per_s=tokens / timing.median_s,
        peak_bytes=check.peak_bytes, loss=check.loss, grads_match=match, grads_max_abs_diff=diff,
        device_budget=getattr(c, "device_budget", None),
        offloaded_bytes=rep.get("offloaded_bytes"), recomputed_bytes=rep.get("recomputed_bytes"),
        overlap_fraction=rep.get("overlap_fraction"), stall_s=stall, report=rep)
