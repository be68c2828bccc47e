"""PyTorch Lightning: a tiny LightningModule around the tiny GPT, trained on the CPU by
`lightning.pytorch.Trainer` for a few steps; with `offload.integrations.lightning.OffloadCallback`
the per-step losses and the trained weights equal a plain run bitwise."""
from __future__ import annotations

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from bench.gpt import make_batch  # noqa: E402
from offload import HybridCheckpointer, OffloadError, Report  # noqa: E402
from offload.integrations.lightning import OffloadCallback  # noqa: E402

from .conftest import MIN_OFFLOAD, TINY, assert_same_training, mixed, tiny_gpt  # noqa: E402

STEPS = 3
pytestmark = [pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
              pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")]


class Lit(pl.LightningModule):
    def __init__(self, through_self: bool = False):
        super().__init__()
        self.model = tiny_gpt()
        self.through_self = through_self
        self.losses: list[torch.Tensor] = []

    def forward(self, idx, tgt):
        return self.model(idx, tgt)

    def training_step(self, batch, batch_idx):
        idx, tgt = batch
        _, loss = self(idx, tgt) if self.through_self else self.model(idx, tgt)
        self.losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch, batch_idx):
        idx, tgt = batch
        return self.model(idx, tgt)[1]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(n: int = STEPS):
    pairs = [make_batch(TINY, 4, seed=s) for s in range(n)]
    data = torch.utils.data.TensorDataset(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
    return torch.utils.data.DataLoader(data, batch_size=None)  # each item is one batch


def fit(lit: Lit, callbacks=(), val: bool = False) -> tuple[list, dict]:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         num_sanity_val_steps=0, limit_val_batches=1 if val else 0, val_check_interval=1 if val else None,
                         callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(lit, train_dataloaders=batches(), val_dataloaders=batches(1) if val else None)
    return lit.losses, {n: p.detach().clone() for n, p in lit.named_parameters()}


@pytest.fixture(scope="module")
def plain():
    return fit(Lit())


@pytest.mark.parametrize("policy", [mixed, "offload"], ids=["mixed", "offload"])
def test_lightning_with_the_callback_is_bitwise_equal(plain, policy):
    lit = Lit()
    hc = HybridCheckpointer(lit.model, policy=policy, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    reports = []
    callback = OffloadCallback(hc, on_report=lambda step, report: reports.append((step, report)))
    assert_same_training(plain, fit(lit, [callback]), STEPS)
    assert [step for step, _ in reports] == list(range(1, STEPS + 1))
    assert all(isinstance(r, Report) for _, r in reports) and callback.report is reports[-1][1]
    assert callback.report.offloaded_bytes > 0
    assert hc.stats.replays == (2 if policy is mixed else 0)
    assert callback._handle is None  # removed at the end of fit
    hc.close()


def test_a_lightning_module_calling_itself_can_be_the_model(plain):
    lit = Lit(through_self=True)
    hc = HybridCheckpointer(lit, policy="recompute", host_budget="64MiB")
    assert [r.name for r in hc.regions] == [f"model.transformer.h.{i}" for i in range(4)]
    assert_same_training(plain, fit(lit, [OffloadCallback(hc)]), STEPS)
    assert hc.stats.replays == 4
    hc.close()


def test_validation_runs_plain(plain):
    lit = Lit()
    hc = HybridCheckpointer(lit.model, policy="recompute", host_budget="64MiB")
    calls = []
    lit.model.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    fit(lit, [OffloadCallback(hc)], val=True)
    assert calls.count(True) == STEPS and calls.count(False) == STEPS  # a validation batch after each step
    assert hc.stats.forwards == 1  # only the training forward of the last step entered the runtime
    hc.close()


def test_a_training_step_that_never_calls_the_attached_module_is_refused():
    lit = Lit()  # training_step calls self.model, not self
    hc = HybridCheckpointer(lit, policy="recompute", host_budget="64MiB")
    with pytest.raises(OffloadError, match="training_step ran without calling the forward of Lit"):
        fit(lit, [OffloadCallback(hc)])
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert not [h for h in lit._forward_pre_hooks.values() if "Attachment" in repr(h)]
