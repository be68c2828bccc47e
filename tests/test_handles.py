"""Layer 3: handles own their storage (Rule 1), one copy per storage (Rule 4), in-place checks
(Rule 5), filters (Rule 6)."""

import pytest
import torch
from torch import nn

from offload import HybridCheckpointer, OffloadError

from .conftest import make_backend, settle

N = 64 * 1024  # floats: 256 KiB, above the 16 KiB threshold used here


def offloader(device, **kw):
    kw.setdefault("host_budget", "64MiB")
    return HybridCheckpointer(policy="offload", regions=None, backend=make_backend(device, kw.pop("delay", 0.0)),
                              min_offload_bytes=16 * 1024, slab_bytes=1 << 20, **kw)


def d2h_copies(hc):
    return [o for o in hc.backend.order if o[0] == "d2h"]


@pytest.mark.parametrize("case", ["same_thrice", "transpose", "two_views"])
def test_one_host_copy_per_storage(device, case):
    hc = offloader(device)
    x = torch.randn(256, 256, device=device, requires_grad=True)
    def f(x):
        h = x * 1.5  # a non-leaf activation, one storage; each op below saves only its input
        if case == "same_thrice":
            return h, h.sin() + h.cos() + h.pow(2)
        if case == "transpose":
            return h, h.sin() + h.t().cos()
        return h, h[:128].sin() + h[128:].cos()

    with hc:
        h, y = f(x)
    assert len(d2h_copies(hc)) == 1
    assert hc.stats.d2h_bytes == h.untyped_storage().nbytes()
    assert hc.stats.offloaded_bytes == h.untyped_storage().nbytes()
    y.sum().backward()
    ref = x.detach().clone().requires_grad_()
    f(ref)[1].sum().backward()
    assert torch.equal(x.grad, ref.grad)


def test_in_place_after_save_raises_for_keep_and_offload(device):
    for policy in ("keep", "offload"):
        hc = HybridCheckpointer(policy=policy, regions=None, backend=make_backend(device),
                                min_offload_bytes=1024, host_budget="16MiB")
        x = torch.randn(N, device=device, requires_grad=True)
        with hc:
            y = (x * 2).exp()  # exp saves its output
        y.mul_(3)
        with pytest.raises(OffloadError, match="modified in place"):
            y.sum().backward()
    # a plain run raises too (autograd's own check), so we are not stricter than PyTorch
    x = torch.randn(N, device=device, requires_grad=True)
    y = (x * 2).exp()
    y.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_unpack_is_repeatable_and_frees_nothing(device):
    hc = offloader(device)
    x = torch.randn(N, device=device, requires_grad=True)
    with hc:
        y = (x * 2).sin()
    first = y.grad_fn._saved_self.clone()
    second = y.grad_fn._saved_self  # a second read: the handle must still have it
    assert torch.equal(first, second)
    y.sum().backward(retain_graph=True)
    g1 = x.grad.clone()
    x.grad = None
    y.sum().backward()
    assert torch.equal(g1, x.grad)


def test_handles_die_with_their_graph_and_return_host_blocks(device):
    hc = offloader(device, delay=0.01)
    x = torch.randn(N, device=device, requires_grad=True)
    with hc:
        y = (x * 2).sin().cos()
    assert hc.host_pool.in_use > 0
    del y  # never backpropagated: the graph and its handles go
    settle(hc)
    assert hc.host_pool.in_use == 0


def test_parameters_buffers_small_and_foreign_tensors_stay():
    lin = nn.Linear(512, 512)
    lin.register_buffer("scale", torch.randn(256, 512))
    hc = HybridCheckpointer(lin, policy="offload", regions=None, min_offload_bytes=64 * 1024,
                            host_budget="16MiB")
    x = torch.randn(256, 512, requires_grad=True)
    small = torch.randn(8, requires_grad=True)
    with hc:
        y = lin(x * 1.0)  # saves the activation and the weight (a parameter view)
        z = y * lin.scale  # saves the buffer only (it needs no grad, y is not saved)
        w = (small * 1.0).exp()  # below the threshold
    s = hc.stats
    assert s.offloaded_bytes == 256 * 512 * 4  # the activation; not the weight, the buffer, small
    assert s.skipped_param_bytes == 512 * 512 * 4 + 256 * 512 * 4
    assert s.kept_bytes == 8 * 4  # exp saves its output, below the threshold
    (z.sum() + w.sum()).backward()


def test_fake_and_subclass_tensors_are_kept():
    from torch._subclasses.fake_tensor import FakeTensorMode
    hc = HybridCheckpointer(policy="offload", regions=None, min_offload_bytes=0, host_budget="16MiB")
    with FakeTensorMode():
        x = torch.randn(N, requires_grad=True)
        with hc:
            (x * 2).sin()
    assert hc.stats.offloaded_bytes == 0
    assert hc.stats.kept_bytes > 0
