"""`regions=` the way PyTorch users write it: a module list, any iterable of modules, a module
list's name, a block class (as FSDP's and accelerate's wrap policies take); regions that are not
part of the model, and a checkpointer run on another model, are refused with the fix. On
encoder-decoder models (T5, BART) "auto" finds every repeated stack, encoder and decoder."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bench.gpt import Block, MLP
from offload import HybridCheckpointer, OffloadError

from .conftest import MIN_OFFLOAD, assert_bitwise, tiny_gpt, train

BLOCKS = [f"transformer.h.{i}" for i in range(4)]


def regions_of(model, regions) -> list[str]:
    hc = HybridCheckpointer(model, policy="recompute", regions=regions, host_budget="16MiB")
    assert all(r.module is model.get_submodule("" if r.name == "(model)" else r.name) for r in hc.regions)
    return [r.name for r in hc.regions]


@pytest.mark.parametrize("form", ["module list", "name", "class", "classes", "generator", "tuple", "auto"])
def test_every_form_names_the_same_blocks(form):
    model = tiny_gpt()
    regions = {"module list": model.transformer.h, "name": "transformer.h", "class": Block,
               "classes": {Block}, "generator": (b for b in model.transformer.h),
               "tuple": tuple(model.transformer.h), "auto": "auto"}[form]
    assert regions_of(model, regions) == BLOCKS


def test_a_module_list_as_regions_recomputes_bitwise_equal():
    ref = train(tiny_gpt(), None, steps=3)
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="recompute", regions=model.transformer.h, host_budget="16MiB")
    assert_bitwise(ref, train(model, hc, steps=3))
    assert hc.stats.replays == 4 and hc.stats.recomputed_bytes > 0
    hc.close()


def test_a_block_class_matches_the_outermost_modules_only():
    model = tiny_gpt()
    assert regions_of(model, MLP) == [f"{b}.mlp" for b in BLOCKS]
    assert regions_of(model, (Block, MLP)) == BLOCKS  # an MLP inside a Block is part of that region
    assert regions_of(model, type(model)) == ["(model)"]  # the whole model: one region


def test_a_sequential_with_named_children_keeps_their_names():
    named = nn.Sequential()
    named.add_module("first", nn.Linear(8, 8))
    named.add_module("second", nn.Linear(8, 8))
    model = nn.Sequential()
    model.add_module("body", named)
    assert regions_of(model, "body") == ["body.first", "body.second"]
    assert regions_of(model, model.body) == ["body.first", "body.second"]


def test_auto_takes_further_stacks_only_when_they_are_not_dwarfed_or_nested():
    class Model(nn.Module):
        def __init__(self, small: int):
            super().__init__()
            self.body = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
            self.head = nn.ModuleList(nn.Linear(small, small) for _ in range(2))
            self.acts = nn.ModuleList(nn.ReLU() for _ in range(3))

    assert [r.name for r in HybridCheckpointer(Model(8), policy="keep", host_budget="1MiB").regions] == \
        [f"body.{i}" for i in range(4)]  # 2 x 72 parameters next to 4 x 4160: a head, not a stack
    assert [r.name for r in HybridCheckpointer(Model(64), policy="keep", host_budget="1MiB").regions] == \
        [f"body.{i}" for i in range(4)] + ["head.0", "head.1"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))

    nested = nn.Module()
    nested.body = nn.ModuleList(Block() for _ in range(4))  # each inner list: 25% of body, but inside it
    assert [r.name for r in HybridCheckpointer(nested, policy="keep", host_budget="1MiB").regions] == \
        [f"body.{i}" for i in range(4)]


def test_a_module_dict_gives_its_modules():
    model = tiny_gpt()
    blocks = nn.ModuleDict({str(i): b for i, b in enumerate(model.transformer.h)})
    assert regions_of(model, blocks) == BLOCKS


@pytest.mark.parametrize("regions, error, message", [
    ("transformer.nope", ValueError, "no submodule 'transformer.nope'"),
    ("transformer.h.0", ValueError, "not a module list"),
    ("", ValueError, "not a module list"),
    (nn.Conv1d, ValueError, "no Conv1d"),
    ((Block, 3), TypeError, "int"),
    (str, TypeError, "str"),
    (7, TypeError, "int"),
])
def test_bad_regions_are_named(regions, error, message):
    model = tiny_gpt()
    with pytest.raises(error, match="regions=") as err:
        HybridCheckpointer(model, policy="recompute", regions=regions, host_budget="16MiB")
    assert message in str(err.value)


def test_a_name_that_is_not_a_module_list_suggests_the_lists():
    with pytest.raises(ValueError) as err:
        HybridCheckpointer(tiny_gpt(), policy="recompute", regions="transformer.nope", host_budget="16MiB")
    assert "'transformer.h'" in str(err.value)
    with pytest.raises(ValueError) as err:
        HybridCheckpointer(tiny_gpt(), policy="recompute", regions=nn.Conv1d, host_budget="16MiB")
    assert "Block" in str(err.value)  # the block classes the model has


def test_a_name_or_class_needs_the_model():
    for regions in ("transformer.h", Block):
        with pytest.raises(ValueError, match="model="):
            HybridCheckpointer(policy="offload", regions=regions, host_budget="16MiB")


def test_regions_that_are_not_part_of_the_model_are_refused():
    model, other = tiny_gpt(), tiny_gpt()
    with pytest.raises(ValueError, match="not a submodule") as err:
        HybridCheckpointer(model, policy="recompute", regions=other.transformer.h, host_budget="16MiB")
    assert "Block" in str(err.value) and "GPT" in str(err.value)
    with pytest.raises(ValueError, match="item 2"):
        HybridCheckpointer(model, policy="recompute", host_budget="16MiB",
                           regions=[model.transformer.h[0], model.transformer.h[1], other.transformer.h[2]])


def test_regions_without_a_model_are_taken_as_given():
    model = tiny_gpt()
    hc = HybridCheckpointer(policy="recompute", regions=model.transformer.h, host_budget="16MiB")
    assert [r.module for r in hc.regions] == list(model.transformer.h)


def test_a_checkpointer_run_on_another_model_is_refused_and_stays_usable():
    model = tiny_gpt()
    copy_ = copy.deepcopy(model)  # the classic slip: the checkpointer holds the original
    hc = HybridCheckpointer(model, policy="recompute", min_offload_bytes=MIN_OFFLOAD, host_budget="16MiB")
    with pytest.raises(OffloadError, match="never called the model") as err:
        train(copy_, hc, steps=1)
    assert "GPT" in str(err.value)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    ref = train(tiny_gpt(), None, steps=2)
    assert_bitwise(ref, train(model, hc, steps=2))
    assert hc.stats.replays == 4
    hc.close()


def test_calling_a_region_directly_counts_as_the_model():
    """A user may call part of the model under `with hc:` (e.g. `model.model(...)` of a HF model)."""
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
    x = torch.randn(2, 16, 128, requires_grad=True)
    with hc:
        y = model.transformer.h[0](x)
    y.sum().backward()
    assert hc.stats.replays == 1


def test_a_forward_that_saves_nothing_is_not_refused():
    model, other = tiny_gpt(), nn.Linear(4, 4)
    hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
    with hc, torch.no_grad():
        other(torch.randn(2, 4))


# -- encoder-decoder models ----------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def t5(**config):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.1, **config)).train()


def bart(**config):
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.1,
        **config)).train()


STACKS = {"t5": (t5, ["encoder.block", "decoder.block"]),
          "bart": (bart, ["model.encoder.layers", "model.decoder.layers"])}


def seq2seq_train(model, hc, steps=3, **kw):
    losses, grads = [], []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        ids, labels = torch.randint(3, 128, (2, 32), generator=g), torch.randint(3, 128, (2, 24), generator=g)
        torch.manual_seed(100 + s)
        with hc if hc is not None else torch.enable_grad():
            loss = model(input_ids=ids, labels=labels, **kw).loss
        torch.manual_seed(7)
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("kind", STACKS)
def test_auto_finds_encoder_and_decoder_stacks(kind):
    build, stacks = STACKS[kind]
    model = build()
    names = regions_of(model, "auto")
    enc, dec = stacks
    assert names == [f"{enc}.{i}" for i in range(2)] + [f"{dec}.{i}" for i in range(3)]


@pytest.mark.parametrize("policy", ["recompute", "offload"])
@pytest.mark.parametrize("kind", STACKS)
def test_encoder_decoder_bitwise_equal(kind, policy):
    build, _ = STACKS[kind]
    ref = seq2seq_train(build(), None, use_cache=False)
    model = build()
    hc = HybridCheckpointer(model, policy=policy, min_offload_bytes=4096, host_budget="64MiB")
    assert_bitwise(ref, seq2seq_train(model, hc, use_cache=False))
    if policy == "recompute":
        assert hc.stats.replays == 5  # 2 encoder + 3 decoder blocks
    else:
        assert hc.stats.offloaded_bytes > 0
    hc.close()


def test_t5_config_use_cache_set_late_does_not_reach_the_decoder():
    """T5 hands its decoder a copy of the config: `model.config.use_cache = False` after building
    leaves the decoder building a cache in training (the runtime warns); `use_cache=False` in the
    forward call, `model.decoder.config.use_cache = False`, or a config built with use_cache=False
    all reach it."""
    def warns_of_cache(model, **kw) -> bool:
        hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seq2seq_train(model, hc, steps=1, **kw)
        hc.close()
        return any("KV cache" in str(w.message) for w in caught)

    model = t5()
    model.config.use_cache = False
    assert model.decoder.config.use_cache is True
    assert warns_of_cache(model)
    assert not warns_of_cache(model, use_cache=False)
    model.decoder.config.use_cache = False
    assert not warns_of_cache(model)
    assert not warns_of_cache(t5(use_cache=False))
