"""Hugging Face `transformers.Trainer`: its training forwards run under a checkpointer.

    from offload.integrations.hf import OffloadCallback

    hc = offload.HybridCheckpointer(model, device_budget="12GiB")
    callback = OffloadCallback(hc)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    print(callback.report)  # the last optimizer step's report

The callback attaches the runtime to the Trainer's model when training begins and removes it when
training ends; evaluation runs under `no_grad`, where the attachment is inert. Leave
`TrainingArguments(gradient_checkpointing=False)`: HF's checkpointing hides the layers' tensors
from the runtime. With gradient accumulation the report covers the step's last micro-batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from transformers import TrainerCallback

if TYPE_CHECKING:  # a client of the public API, like user code
    from offload import Attachment, HybridCheckpointer, Report


class OffloadCallback(TrainerCallback):
    """Runs the Trainer's training forwards under `hc`; `report` is the last step's `Report`.

    Args:
        hc: the checkpointer, built for the Trainer's model (or with no model).
        on_report: called as `on_report(global_step, report)` after every optimizer step.
    """

    def __init__(self, hc: "HybridCheckpointer", on_report: Callable[[int, "Report"], None] | None = None):
        self.hc = hc
        self.on_report = on_report
        self.report: "Report | None" = None
        self._handle: "Attachment | None" = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Attach to the model the Trainer trains (the checkpointer's model when it was given none)."""
        self._remove()
        self._handle = self.hc.attach(model if model is not None else self.hc.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.report = self.hc.report()
        if self.on_report is not None:
            self.on_report(state.global_step, self.report)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
