"""Hugging Face transformers: tiny GPT-2 and Llama built from configs (random weights, no
downloads) under the runtime: regions found, every policy bitwise equal to a plain run, HF's own
gradient checkpointing alongside ours, and policy="auto" under half the keep-mode bytes.

HF models build a KV cache (`DynamicCache`) in training too unless `use_cache=False`; the layers
append to it, so replaying a layer appends again. HF's own checkpointing drops the cache for that
reason, and so does the runtime (the replay gets None for the cache). The equality tests pass
`use_cache=False`; the default is covered by
`test_default_kv_cache_with_recompute_is_never_silently_wrong` and
`test_documented_usage_recomputes_with_the_default_kv_cache`. transformers is a test-only
dependency: without it this module is skipped.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from offload import HybridCheckpointer, OffloadError, OffloadWarning  # noqa: E402

from .conftest import mixed, under  # noqa: E402

# The runtime's HF-checkpointing check reads a property transformers 5 deprecates; pinned by
# test_runtime_triggers_no_deprecation_warning_from_transformers, silenced elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB, SEQ, BATCH, LAYERS, HIDDEN = 256, 64, 2, 3, 64
MIN_OFFLOAD = 4096  # activations here are 8-128 KiB
POLICIES = ["keep", "offload", "recompute", mixed]
POLICY_IDS = ["keep", "offload", "recompute", "mixed"]
MODELS = ["gpt2-eager", "gpt2-sdpa", "llama-eager", "llama-sdpa"]
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}


def build(kind: str, attn: str = "eager"):
    """A tiny model with random weights (seed 0) and every dropout the config has set to 0.1."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                         resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                         bos_token_id=0, eos_token_id=0, attn_implementation=attn)
        model = GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=SEQ, attention_dropout=0.1,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation=attn)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    assert model.config._attn_implementation == attn
    return model.train()


def build_id(model_id: str):
    return build(*model_id.split("-"))


def checkpointer(model, policy, **kw) -> HybridCheckpointer:
    kw.setdefault("host_budget", "64MiB")
    return HybridCheckpointer(model, policy=policy, min_offload_bytes=MIN_OFFLOAD, **kw)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))


def train(model, hc: HybridCheckpointer | None, steps: int = 3, use_cache: bool | None = False):
    """`steps` seeded steps (torch.manual_seed before each forward, another seed between forward and
    backward); returns (losses, per-step {name: grad})."""
    losses, grads = [], []
    for s in range(steps):
        ids = batch(s)
        kw = {} if use_cache is None else {"use_cache": use_cache}
        torch.manual_seed(1000 + s)
        with under(hc):
            loss = model(input_ids=ids, labels=ids, **kw).loss
        torch.manual_seed(7)  # the runtime must replay dropout's RNG itself
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return losses, grads


def assert_bitwise(ref, got) -> None:
    for s, (a, b) in enumerate(zip(ref[0], got[0])):
        assert torch.equal(a, b), f"step {s}: loss {a.item()} != {b.item()}"
    for s, (ga, gb) in enumerate(zip(ref[1], got[1])):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert torch.equal(ga[name], gb[name]), f"step {s}: gradient of {name} differs"


def region_bytes(stats) -> list[int]:
    """Saved bytes (kept + offloaded + recomputed) of each region segment, in call order."""
    return [seg.kept + seg.offloaded + seg.recomputed for _, seg in sorted(stats.segments.items())
            if not seg.name.startswith("(")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a small shared machine: intra-op threads only cost (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference():
    """Plain runs, one per model, computed on first use."""
    cache = {}

    def get(model_id: str, steps: int = 3):
        if (model_id, steps) not in cache:
            cache[model_id, steps] = train(build_id(model_id), None, steps=steps)
        return cache[model_id, steps]

    return get


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_auto_regions_are_the_decoder_blocks(kind):
    hc = HybridCheckpointer(build(kind), policy="offload", regions="auto")
    assert [r.name for r in hc.regions] == [f"{BLOCKS[kind]}.{i}" for i in range(LAYERS)]


@pytest.mark.parametrize("model_id", MODELS)
def test_dropout_is_live_so_rng_replay_is_tested(model_id):
    model = build_id(model_id)
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(model(input_ids=batch(0), labels=batch(0), use_cache=False).loss)
    assert not torch.equal(*losses)


@pytest.mark.parametrize("policy", POLICIES, ids=POLICY_IDS)
@pytest.mark.parametrize("model_id", MODELS)
def test_policy_gradients_bitwise_equal_to_plain(reference, model_id, policy):
    model = build_id(model_id)
    hc = checkpointer(model, policy)
    assert_bitwise(reference(model_id), train(model, hc))
    s = hc.stats
    if policy in ("offload", mixed):
        assert s.offloaded_bytes > 0 and s.d2h_bytes == s.h2d_bytes > 0
    if policy in ("recompute", mixed):
        assert s.recomputed_bytes > 0 and s.replays == (LAYERS if policy == "recompute" else 2)
    if policy == "keep":
        assert s.offloaded_bytes == s.recomputed_bytes == 0 and s.kept_bytes > 0
    assert s.fallback_count == 0
    hc.close()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_three_line_usage(kind):
    """The Hugging Face usage, as written in the docs:

        with hc:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    """
    ref = build(kind)
    model = build(kind)
    hc = HybridCheckpointer(model, policy="offload", min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    ids = batch(0)
    torch.manual_seed(5)
    with hc:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.manual_seed(5)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert hc.stats.offloaded_bytes > 0
    hc.close()


@pytest.mark.parametrize("policy", ["recompute", mixed], ids=["recompute", "mixed"])
@pytest.mark.parametrize("model_id", MODELS)
def test_default_kv_cache_with_recompute_is_never_silently_wrong(reference, model_id, policy):
    """Without `use_cache=False`, HF builds a DynamicCache in training and every layer appends its
    keys/values to it, so a replayed layer appends a second time. The runtime must then either
    raise OffloadError naming the layer, or give bitwise-equal gradients; never wrong ones.

    Observed (transformers 5.24): eager attention raises (the replay saves keys of length 2*SEQ);
    sdpa gives equal gradients, because HF's sdpa path slices the keys back to the query length.
    """
    model = build_id(model_id)
    hc = checkpointer(model, policy)
    try:
        got = train(model, hc, use_cache=None)
    except OffloadError as e:
        assert f"{BLOCKS[model_id.split('-')[0]]}." in str(e)
    else:
        assert_bitwise(reference(model_id), got)
    finally:
        hc.close()


@pytest.mark.parametrize("model_id, policy", [("gpt2-eager", "recompute"), ("llama-eager", "auto")])
def test_documented_usage_recomputes_with_the_default_kv_cache(reference, model_id, policy):
    """`loss = model(input_ids=ids, labels=ids).loss` as documented (HF's default use_cache), with
    a policy that recomputes layers: "recompute", or "auto" (the default) under half the keep
    bytes with no host memory to offload to, where the plan recomputes layers."""
    kw = {}
    if policy == "auto":
        keep_model = build_id(model_id)
        keep = checkpointer(keep_model, "keep")
        train(keep_model, keep, steps=1)
        kw.update(device_budget=keep.stats.kept_bytes // 2, host_budget=1)
        keep.close()
    model = build_id(model_id)
    hc = checkpointer(model, policy, **kw)
    try:
        got = train(model, hc, steps=4, use_cache=None)
    finally:
        hc.close()
    ref = reference(model_id, steps=4)  # use_cache=False: the cache does not change the gradients
    assert_bitwise(ref, got)
    assert hc.stats.recomputed_bytes > 0


# -- HF's own gradient checkpointing -----------------------------------------------------------------
def hf_checkpointing(model, reentrant: bool):
    with warnings.catch_warnings():  # transformers 5 deprecates this name for activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("policy", POLICIES, ids=POLICY_IDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_gradient_checkpointing_with_runtime_is_equal_but_hides_the_layers(reference, kind, policy, reentrant):
    """Observed: with `model.gradient_checkpointing_enable()`, HF wraps every layer's forward in
    torch.utils.checkpoint; its saved-tensor hooks sit inside ours, so the runtime only sees what
    the checkpoint saves (each layer's hidden-state input and the attention mask / rotary
    cos-sin), never the tensors inside the layers. Gradients stay bitwise equal to a plain run
    (no checkpointing) for every policy and both checkpoint flavours.

    Under "recompute" (and the recomputed blocks of "mixed") the runtime still replays each such
    layer in backward, only to refill those inputs, which it already holds: a wasted layer forward
    per layer, on top of HF's own recompute. Pinned here as observed (replays); see the report."""
    model = hf_checkpointing(build(kind), reentrant)
    hc = checkpointer(model, policy)
    assert_bitwise(reference(f"{kind}-eager"), train(model, hc))
    hidden_state = BATCH * SEQ * HIDDEN * 4
    seen = region_bytes(hc.stats)
    assert len(seen) == LAYERS
    assert all(0 < b <= 2.5 * hidden_state for b in seen), seen  # inputs only (+ rotary cos/sin)
    assert hc.stats.recomputed_bytes == 0
    assert hc.stats.replays == {"recompute": LAYERS, "keep": 0, "offload": 0}.get(policy, 2)  # observed

    plain_model = build(kind)
    plain = checkpointer(plain_model, "keep")  # without HF checkpointing: every layer's tensors
    train(plain_model, plain, steps=1)
    assert all(b > 10 * hidden_state for b in region_bytes(plain.stats))
    hc.close()
    plain.close()


def checkpointing_warnings(caught) -> list:
    return [w for w in caught if issubclass(w.category, OffloadWarning) and "gradient_checkpointing" in str(w.message)]


def test_hf_gradient_checkpointing_is_detected_with_a_warning():
    model = hf_checkpointing(build("gpt2"), reentrant=False)
    hc = checkpointer(model, "recompute")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, hc, steps=2)
    hits = checkpointing_warnings(caught)
    assert len(hits) == 1, [str(w.message) for w in caught]  # once, not per forward


def test_default_kv_cache_in_training_warns_once():
    model = build("llama")
    hc = checkpointer(model, "keep")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, hc, steps=2, use_cache=None)
    hits = [w for w in caught if issubclass(w.category, OffloadWarning) and "KV cache" in str(w.message)]
    assert len(hits) == 1 and "use_cache=False" in str(hits[0].message), [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = build("llama")
        train(plain, checkpointer(plain, "keep"), steps=1, use_cache=False)
    assert not [w for w in caught if "KV cache" in str(w.message)]


def test_hf_gradient_checkpointing_is_detected_through_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs a fresh gloo process group")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DDP(hf_checkpointing(build("gpt2"), reentrant=False))
        hc = checkpointer(ddp, "offload")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = batch(0)
            with hc:
                loss = ddp(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        hc.close()
    finally:
        dist.destroy_process_group()
    assert checkpointing_warnings(caught)


def test_no_hf_gradient_checkpointing_no_warning():
    model = build("gpt2")
    hc = checkpointer(model, "recompute")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, hc, steps=1)
    assert not checkpointing_warnings(caught)


def test_runtime_triggers_no_deprecation_warning_from_transformers():
    model = build("gpt2")
    hc = checkpointer(model, "keep")
    ids = batch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with hc:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]


# -- policy="auto" -----------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_auto_under_half_the_keep_bytes_is_bitwise_equal(reference, attn):
    model_id = f"llama-{attn}"
    keep_model = build_id(model_id)
    keep = checkpointer(keep_model, "keep")
    train(keep_model, keep, steps=1)
    budget = keep.stats.kept_bytes // 2
    keep.close()

    model = build_id(model_id)
    hc = checkpointer(model, "auto", device_budget=budget)
    assert_bitwise(reference(model_id, steps=4), train(model, hc, steps=4))  # profiles, then plans
    r = hc.report()
    assert r.predicted is not None and r.predicted["peak_bytes"] <= budget
    assert r.offloaded_bytes + r.recomputed_bytes > 0
    assert hc.stats.kept_bytes <= budget
    hc.close()
