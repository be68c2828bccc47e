"""The scheduler's plan as a user reads it: one row per segment, sizes formatted, notes in words.

`describe` turns a `Plan` and the `Profile` it was made for into plain data (what the report's
`predicted` holds, JSON-clean); `format_plan` prints that as a table; `PlanView` is the `Plan`
that `hc.plan` returns, printable as that table. The planner's notes are written for its own
authors ("rule 1 dropped", "budget 15728640"); `explain_note` says the same to a user.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from scheduler.plan import Action, Plan
from scheduler.profile import Profile

from .units import fmt_bytes, fmt_ms


def describe(plan: Plan, profile: Profile | None, reserve_bytes: int = 0) -> dict:
    """The plan's predictions and one row per segment: index, name, action, saved bytes,
    offloaded tensors and bytes, bytes of a recomputed region's inputs that are offloaded."""
    per_segment: dict[int, list] = {}
    for t in profile.tensors if profile is not None else ():
        per_segment.setdefault(t.segment, []).append(t)
    names = {s.index: s.name for s in profile.segments} if profile is not None else {}
    inputs = {s.index: s.input_bytes for s in profile.segments} if profile is not None else {}
    rows = []
    for i, sp in enumerate(plan.segments):
        tensors = per_segment.get(i, [])
        moved = [t for t in tensors if t.id in plan.offload_ids] if sp.action is Action.OFFLOAD else []
        rows.append(dict(
            index=i, name=names.get(i, f"segment {i}"), action="selective" if sp.selective else sp.action.value,
            stored_ops=len(sp.store_ops),
            saved_bytes=sum(t.nbytes for t in tensors),
            offloaded_tensors=len(moved), offloaded_bytes=sum(t.nbytes for t in moved),
            inputs_offloaded_bytes=inputs.get(i, 0) if sp.action is Action.RECOMPUTE and sp.offload_inputs else 0))
    return dict(
        step_s=plan.predicted_step_s, peak_bytes=plan.predicted_peak_bytes, host_bytes=plan.predicted_host_bytes,
        offloaded_bytes=sum(r["offloaded_bytes"] + r["inputs_offloaded_bytes"] for r in rows),
        recomputed_bytes=sum(r["saved_bytes"] for r in rows if r["action"] in (Action.RECOMPUTE.value, "selective")),
        reserve_bytes=reserve_bytes, lookahead=plan.lookahead,
        mix=plan_mix(plan),
        notes=[explain_note(n) for n in plan.notes], segments=rows)


def plan_mix(plan: Plan) -> str:
    """How many segments get each action: "5 keep, 2 offload, 2 recompute, 1 selective"."""
    counts = {a.value: sum(1 for s in plan.segments if s.action is a and not s.selective) for a in Action}
    counts["selective"] = sum(1 for s in plan.segments if s.selective)
    return ", ".join(f"{n} {a}" for a, n in counts.items() if n)


def format_plan(desc: dict) -> str:
    """`describe`'s data as text: a summary, the per-segment table, the notes."""
    reserve = desc["reserve_bytes"]
    lines = [f"plan: {desc['mix']}; reloads issued {desc['lookahead']} segment(s) ahead of backward",
             f"predicted: step {fmt_ms(desc['step_s'])}, saved activations on the device at most "
             f"{fmt_bytes(desc['peak_bytes'])}"
             + (f" ({fmt_bytes(reserve)} of the budget left for backward)" if reserve else "")
             + f", pinned host {fmt_bytes(desc['host_bytes'])}",
             f"{'#':>3}  {'segment':<26} {'action':<10} {'saved':>10} {'offloaded':>10} {'tensors':>7} "
             f"{'inputs offloaded':>16}"]
    for r in desc["segments"]:
        moved = r["offloaded_bytes"] if r["offloaded_tensors"] else None
        lines.append(f"{r['index']:>3}  {r['name'][:26]:<26} {r['action']:<10} {fmt_bytes(r['saved_bytes']):>10} "
                     f"{_or_dash(moved):>10} {r['offloaded_tensors'] or '-':>7} "
                     f"{_or_dash(r['inputs_offloaded_bytes'] or None):>16}")
    lines += [f"note: {n}" for n in desc["notes"]]
    return "\n".join(lines)


def _or_dash(nbytes: int | None) -> str:
    return "-" if nbytes is None else fmt_bytes(nbytes)


_UNIFORM = {"RECOMPUTE": "recomputing every block", "OFFLOAD": "offloading every tensor that can move",
            "KEEP": "keeping everything"}


def _bytes_or_limit(text: str) -> str:
    return "no limit" if text == "None" else fmt_bytes(int(text))


def explain_note(note: str) -> str:
    """A planner note in a user's words, sizes formatted. Notes it does not know keep their
    wording, with their byte counts formatted."""
    if note.startswith("keep-all fits"):
        return "everything fits in the device budget: every activation stays on the device"
    if note.startswith("rule 1 dropped"):
        return ("the device budget cannot be met with the last block(s) kept on the device, where backward "
                "needs them first: they are moved too, and their copies or recompute cannot be hidden")
    m = re.match(r"rule 5: uniform (\w+) beats", note)
    if m:
        what = _UNIFORM.get(m.group(1), m.group(1).lower())
        return f"{what} is at least as fast as the plan the search found at this budget, so the plan does that"
    m = re.match(r"infeasible: .*? peaks at (\d+) device bytes \(budget (\d+|None)\) and (\d+) host bytes "
                 r"\(budget (\d+|None)\)", note)
    if m:
        peak, budget, host, host_budget = m.groups()
        host_limit = "no host limit" if host_budget == "None" else f"host budget {_bytes_or_limit(host_budget)}"
        return (f"the device budget cannot be met: the plan that needs the least memory still holds "
                f"{fmt_bytes(int(peak))} of saved activations on the device (planned under {_bytes_or_limit(budget)}) "
                f"and {fmt_bytes(int(host))} of pinned host memory ({host_limit}); it runs anyway. Raise "
                f"device_budget, or lower the batch size or sequence length")
    note = re.sub(r"\b(\d+) ((?:device |host )?)bytes\b",
                  lambda m: f"{fmt_bytes(int(m.group(1)))} {m.group(2)}".rstrip(), note)
    return re.sub(r"\bbudget (\d+)\b", lambda m: f"budget {fmt_bytes(int(m.group(1)))}", note)


@dataclass(frozen=True)
class PlanView(Plan):
    """The scheduler's `Plan` (every field and method as is) that prints as a table of its
    segments with the names and sizes of the profile it was made for."""

    profile: Profile | None = field(default=None, repr=False, compare=False, hash=False)
    reserve_bytes: int = field(default=0, compare=False, hash=False)  # device budget left for backward

    @classmethod
    def of(cls, plan: Plan, profile: Profile | None, reserve_bytes: int = 0) -> "PlanView":
        return cls(**{f.name: getattr(plan, f.name) for f in fields(Plan)}, profile=profile,
                   reserve_bytes=reserve_bytes)

    def describe(self) -> dict:
        """The plan as plain data (see `describe`)."""
        return describe(self, self.profile, self.reserve_bytes)

    def __str__(self) -> str:
        return format_plan(self.describe())
