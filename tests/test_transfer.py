"""Layer 2: the transfer backends follow the stream protocol (Rule 2) on emulation and CUDA."""
import torch

from offload import EmulatedBackend
from offload.transfer.hostpool import HostPool, MIN_SLAB

from .conftest import make_backend


def roundtrip(backend, src, delay_release=True):
    pool = HostPool(backend, budget=4 * MIN_SLAB, slab_bytes=MIN_SLAB)
    flat = src.view(torch.uint8).view(-1)
    blocks = pool.alloc(flat.numel())
    d2h = backend.d2h(flat, [b.view for b in blocks], label="x")
    backend.release(flat, after=d2h if delay_release else None)
    dst, h2d = backend.h2d([b.view for b in blocks], flat.numel(), after=d2h, label="x")
    backend.wait(h2d)
    return dst.view(src.dtype).view(src.shape), backend


def test_roundtrip_is_bitwise(device):
    src = torch.randn(300_000, device=device)
    expected = src.clone()
    out, backend = roundtrip(make_backend(device, delay_s=0.02), src)
    assert torch.equal(out, expected)


def test_reload_waits_for_its_offload():
    backend = EmulatedBackend(d2h_delay_s=0.2)
    src = torch.randn(100_000)
    out, _ = roundtrip(backend, src.clone())
    assert torch.equal(out, src)
    assert backend.order == [("d2h", "x"), ("h2d", "x")]


def test_source_released_before_its_copy_is_poisoned():
    """What the GPU would do if the source were freed and reused under the D2H copy."""
    backend = EmulatedBackend(d2h_delay_s=0.2)
    src = torch.randn(100_000)
    out, _ = roundtrip(backend, src, delay_release=False)
    assert backend.poisoned == 1
    assert torch.isnan(out).all()


def test_released_source_lives_until_its_copy_finished():
    backend = EmulatedBackend(d2h_delay_s=0.1)
    src = torch.randn(100_000)
    out, _ = roundtrip(backend, src.clone())
    assert backend.poisoned == 0
    assert torch.equal(out, src)
