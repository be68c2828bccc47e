"""scheduler: what to do with each saved activation, and when to move it.

Pure Python, data in and plan out (DESIGN.md §3): a `Profile` of the step goes in, a frozen
`Plan` of `Action`s comes out, and `simulate` predicts the step a plan gives. Importing it
loads neither torch nor `offload` (nor CUDA, nor NVML).
"""
import logging

from .exact import plan_exact
from .hardware import PRESETS, Hardware, get_hardware
from .inflight import plan_in_flight
from .plan import Action, Plan, SegmentPlan
from .planner import backward_reserve, plan, plan_uniform
from .prefetch import issue_order, lookahead
from .profile import OpRecord, Profile, SegmentRecord, TensorRecord
from .shapes import ShapeFit
from .simulate import Interval, Timeline, simulate

__all__ = [
    # the contract with offload
    "Action", "SegmentPlan", "Plan", "Profile", "SegmentRecord", "TensorRecord", "OpRecord",
    # hardware figures
    "Hardware", "PRESETS", "get_hardware",
    # planning
    "plan", "plan_exact", "plan_uniform", "plan_in_flight", "backward_reserve", "lookahead", "issue_order",
    # new input shapes without profiling
    "ShapeFit",
    # prediction
    "simulate", "Timeline", "Interval",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
