"""PyTorch Lightning: the training forwards of a LightningModule's network run under a checkpointer.

    from offload.integrations.lightning import OffloadCallback

    hc = offload.HybridCheckpointer(lit_module.model, device_budget="12GiB")
    trainer = lightning.Trainer(callbacks=[OffloadCallback(hc)], ...)
    trainer.fit(lit_module, data)

Lightning calls `training_step`, not the module's forward, so the callback attaches to the module
`training_step` calls: `module=`, else the checkpointer's model, else the LightningModule (which
then has to call `self(...)`). If a training batch ends without that module's forward having run
under the runtime, the callback raises `OffloadError` rather than train with the runtime idle.
Validation and prediction run under `no_grad` / `inference_mode`, where the attachment is inert.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from lightning.pytorch import Callback
from torch import nn

from offload import OffloadError  # a client of the public API, like user code

if TYPE_CHECKING:
    from offload import Attachment, HybridCheckpointer, Report


class OffloadCallback(Callback):
    """Runs the training forwards of `module` under `hc`; `report` is the last batch's `Report`.

    Args:
        hc: the checkpointer.
        module: the module `training_step` calls (default: `hc.model`, else the LightningModule).
        on_report: called as `on_report(global_step, report)` after every training batch.
    """

    def __init__(self, hc: "HybridCheckpointer", module: nn.Module | None = None,
                 on_report: Callable[[int, "Report"], None] | None = None):
        self.hc = hc
        self.module = module
        self.on_report = on_report
        self.report: "Report | None" = None
        self._handle: "Attachment | None" = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._remove()
        target = self.module if self.module is not None else self.hc.model
        self._handle = self.hc.attach(target if target is not None else pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        handle = self._handle
        if handle is not None and handle.forwards == 0:
            raise OffloadError(
                f"offload.integrations.lightning.OffloadCallback: training_step ran without calling the "
                f"forward of {type(handle.module).__name__}, the module the checkpointer is attached to, "
                f"so nothing ran under it. Build the checkpointer for the network training_step calls "
                f"(HybridCheckpointer(self.model)), pass OffloadCallback(hc, module=...), or call "
                f"self(...) in training_step")
        self.report = self.hc.report()
        if self.on_report is not None:
            self.on_report(trainer.global_step, self.report)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
