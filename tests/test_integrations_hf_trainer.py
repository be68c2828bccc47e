"""Hugging Face `transformers.Trainer` (with `accelerate` under it) on a tiny Llama built from a
config, on the CPU: with `offload.integrations.hf.OffloadCallback` the per-step losses and the
trained weights equal a plain Trainer run bitwise, and a report is there after every step."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from offload import HybridCheckpointer, OffloadError, Report  # noqa: E402
from offload.integrations.hf import OffloadCallback  # noqa: E402

from .conftest import assert_same_training, mixed  # noqa: E402

VOCAB, SEQ, HIDDEN, LAYERS, STEPS = 256, 64, 64, 3, 3


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      attention_dropout=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      use_cache=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def fit(tmp_path, callback_for=None, **args):
    """STEPS optimizer steps; returns (per-forward losses, final weights, the model, the callback)."""
    model = llama()
    losses = []
    model.register_forward_hook(lambda mod, a, out: losses.append(out.loss.detach().clone()) if mod.training else None)
    callback = callback_for(model) if callback_for else None
    trainer = Trainer(model=model, train_dataset=Tokens(), callbacks=[callback] if callback else None,
                      args=TrainingArguments(
                          output_dir=str(tmp_path), use_cpu=True, max_steps=STEPS, per_device_train_batch_size=2,
                          learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                          data_seed=0, dataloader_num_workers=0, disable_tqdm=True, **args))
    trainer.train()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, model, callback


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("policy", [mixed, "recompute"], ids=["mixed", "recompute"])
def test_trainer_with_the_callback_is_bitwise_equal(tmp_path, plain, policy):
    reports = []

    def callback_for(model):
        hc = HybridCheckpointer(model, policy=policy, min_offload_bytes=4096, host_budget="64MiB")
        return OffloadCallback(hc, on_report=lambda step, report: reports.append((step, report)))

    got = fit(tmp_path, callback_for)
    assert_same_training(plain, got, STEPS)
    callback = got[3]
    assert [step for step, _ in reports] == list(range(1, STEPS + 1))
    assert all(isinstance(r, Report) for _, r in reports) and callback.report is reports[-1][1]
    last = callback.report
    assert last.recomputed_bytes > 0
    if policy is mixed:
        assert last.offloaded_bytes > 0
    assert callback.hc.stats.replays == (2 if policy is mixed else LAYERS)
    assert callback._handle is None  # removed when training ended
    model = got[2]
    assert not model._forward_pre_hooks or all("Attachment" not in repr(h) for h in model._forward_pre_hooks.values())
    callback.hc.close()


def test_evaluation_runs_plain(tmp_path):
    model = llama()
    hc = HybridCheckpointer(model, policy="recompute", host_budget="64MiB")
    trainer = Trainer(model=model, train_dataset=Tokens(8), eval_dataset=Tokens(4), callbacks=[OffloadCallback(hc)],
                      args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1,
                                             per_device_train_batch_size=2, per_device_eval_batch_size=2,
                                             report_to="none", save_strategy="no", eval_strategy="steps",
                                             eval_steps=1, disable_tqdm=True))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    trainer.train()
    assert calls == [True, False, False]  # one training forward, then two evaluation batches
    assert any("eval_loss" in h for h in trainer.state.log_history)
    assert hc.stats.step == 1 and hc.stats.forwards == 1  # evaluation did not enter the runtime
    hc.close()


def test_a_checkpointer_for_another_model_is_refused_at_train_begin(tmp_path):
    other = llama()
    hc = HybridCheckpointer(other, policy="recompute", host_budget="64MiB")
    with pytest.raises(ValueError, match="neither the model"):
        fit(tmp_path, lambda model: OffloadCallback(hc))
