"""Layer 1: the pinned host pool: exact budget, reuse only after copies finish (Rule 3, Rule 2)."""

import pytest
import torch

from offload import EmulatedBackend, HostPool
from offload.transfer.hostpool import ALIGN, MIN_SLAB


def test_budget_is_exact_and_slabs_never_exceed_it():
    pool = HostPool(EmulatedBackend(), budget=3 * MIN_SLAB + MIN_SLAB // 2, slab_bytes=2 * MIN_SLAB)
    got = []
    while (blocks := pool.alloc(300_000)) is not None:
        got.append(blocks)
    assert pool.reserved <= pool.budget
    assert pool.reserved == 3 * MIN_SLAB  # 2 MiB + 1 MiB; the last half MiB is below a slab
    assert pool.in_use == sum(b.nbytes for bl in got for b in bl)
    assert pool.in_use <= pool.reserved
    assert all(b.nbytes % ALIGN == 0 for bl in got for b in bl)
    assert pool.high_water == pool.in_use


def test_large_request_is_split_over_blocks_and_counted_exactly():
    pool = HostPool(EmulatedBackend(), budget=4 * MIN_SLAB, slab_bytes=MIN_SLAB)
    blocks = pool.alloc(3 * MIN_SLAB + 1000)
    assert blocks is not None and len(blocks) == 4
    assert sum(b.view.numel() for b in blocks) == 3 * MIN_SLAB + 1000
    assert pool.in_use == 3 * MIN_SLAB + 1024
    assert pool.alloc(MIN_SLAB) is None  # only 1 MiB - 1 KiB left
    pool.free(blocks, after=[])
    assert pool.in_use == 0
    assert pool.alloc(4 * MIN_SLAB) is not None  # freed ranges merged back


def test_zero_budget_refuses_everything():
    pool = HostPool(EmulatedBackend(), budget=0)
    assert pool.alloc(1) is None
    assert pool.reserved == 0


def test_block_is_not_reused_before_its_copy_finished():
    backend = EmulatedBackend(h2d_delay_s=0.2)
    pool = HostPool(backend, budget=MIN_SLAB, slab_bytes=MIN_SLAB)
    blocks = pool.alloc(MIN_SLAB)
    src = torch.arange(MIN_SLAB // 4, dtype=torch.float32).view(torch.uint8)
    d2h = backend.d2h(src, [b.view for b in blocks])
    backend.release(src, after=d2h)
    dst, h2d = backend.h2d([b.view for b in blocks], MIN_SLAB, after=d2h)
    pool.free(blocks, after=[d2h, h2d])
    assert not backend.query(h2d)
    again = pool.alloc(MIN_SLAB)  # must wait for the reload, not hand the block out under it
    assert again is not None and backend.query(h2d)
    backend.wait(h2d)
    assert torch.equal(dst, src) and backend.poisoned == 0


def test_premature_reuse_is_poisoned_by_the_emulation():
    """The emulation makes a pool bug visible: reuse under a running copy corrupts the copy."""
    backend = EmulatedBackend(h2d_delay_s=0.2)
    pool = HostPool(backend, budget=MIN_SLAB, slab_bytes=MIN_SLAB)
    blocks = pool.alloc(MIN_SLAB)
    src = torch.ones(MIN_SLAB // 4).view(torch.uint8)
    d2h = backend.d2h(src, [b.view for b in blocks])
    backend.wait(d2h)
    dst, h2d = backend.h2d([b.view for b in blocks], MIN_SLAB, after=d2h)
    pool.free(blocks, after=[])  # the bug: no events, as if the reload were done
    pool.alloc(MIN_SLAB)
    backend.wait(h2d)
    assert backend.poisoned == 1
    assert torch.isnan(dst.view(torch.float32)).all()


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="slab_bytes"):
        HostPool(EmulatedBackend(), budget=MIN_SLAB, slab_bytes=3 * MIN_SLAB)
    with pytest.raises(ValueError, match="budget"):
        HostPool(EmulatedBackend(), budget=-1)
