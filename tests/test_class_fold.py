import pytest
import torch
from helpers import rel_err

from collapse_ext import class_fold
from collapse_ext.reference import class_fold_reference


def _state(k, d, device, state_dtype, seed=0, offset=1e3):
    """A pending block over random folded state: some classes with no rows at all, some
    folded and untouched since (pending 0), some new (counts 0, pending > 0)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (k,), generator=g) * torch.randint(0, 2, (k,), generator=g)
    pending = torch.randint(0, 3, (k,), generator=g)
    means = (torch.randn(k, d, generator=g, dtype=torch.float64) * 1e-2 + offset).to(state_dtype)
    sums = (torch.randn(k, d, generator=g, dtype=torch.float64) * 1e-3).to(state_dtype) * (pending > 0).unsqueeze(1)
    sqsums = torch.rand(k, generator=g, dtype=torch.float64) * 1e-3 * pending
    sqdev = torch.rand(k, generator=g, dtype=torch.float64) * 1e-3 * (counts > 0)
    return [t.to(device) for t in (counts, means, pending, sums, sqsums, sqdev)]


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,d", [(0, 4), (5, 0), (1, 1), (300, 37), (3000, 130)])
def test_matches_reference(device, state_dtype, k, d):
    state = _state(k, d, device, state_dtype)
    want = class_fold_reference(*(t.cpu() for t in state))
    class_fold(*state)
    names = ("counts", "means", "pending", "sums", "sqsums", "sqdev")
    for name, a, b in zip(names, state, want):
        assert a.dtype == b.dtype, name
        if a.dtype == torch.int64:
            assert torch.equal(a.cpu(), b), name
        else:  # float64 sums of d terms, in another order
            assert rel_err(a, b) <= 1e-12, name


def test_keeps_the_rounding_of_a_float32_mean():
    """The stored mean is the exact one rounded; the residual N (exact - stored) stays in
    the pending block, so stored + sums / counts is the exact mean again."""
    counts = torch.tensor([3])
    means = torch.tensor([[1000.0, -2.0]])
    pending = torch.tensor([1])
    sums = torch.tensor([[1e-4, 0.5]])
    sqsums = torch.tensor([0.3], dtype=torch.float64)
    sqdev = torch.tensor([0.2], dtype=torch.float64)
    exact = means.double() + sums.double() / 4
    class_fold(counts, means, pending, sums, sqsums, sqdev)
    assert counts.tolist() == [4] and pending.tolist() == [0]
    assert torch.equal(means, exact.float())
    assert means[0, 0].item() == 1000.0  # 1000 + 2.5e-5 rounds back to 1000 in float32
    assert torch.allclose(means.double() + sums.double() / 4, exact, rtol=0, atol=1e-12)
    assert sums[0, 0].item() == pytest.approx(1e-4, rel=1e-6)
    assert sqsums.item() == pytest.approx(sums.double().square().sum().item() / 4, rel=1e-12)
    assert sqdev.item() == pytest.approx(0.2 + 0.3 - (1e-8 + 0.25) / 4, rel=1e-12)


def test_float64_state_leaves_no_residual():
    state = _state(200, 16, "cpu", torch.float64)
    class_fold(*state)
    counts, means, pending, sums, sqsums, sqdev = state
    assert not bool(pending.any()) and not bool(sums.any()) and not bool(sqsums[counts > 0].any())


def test_errors():
    counts, means, pending, sums, sqsums, sqdev = _state(3, 4, "cpu", torch.float64)
    with pytest.raises(RuntimeError, match="means must be float32 or float64"):
        class_fold(counts, means.half(), pending, sums.half(), sqsums, sqdev)
    with pytest.raises(RuntimeError, match="sums must be a contiguous tensor of the shape and dtype of means"):
        class_fold(counts, means, pending, sums.float(), sqsums, sqdev)
    with pytest.raises(RuntimeError, match="counts and pending must be contiguous"):
        class_fold(counts.int(), means, pending, sums, sqsums, sqdev)
    with pytest.raises(RuntimeError, match="sqdev must be contiguous"):
        class_fold(counts, means, pending, sums, sqsums, sqdev[:2])
    with pytest.raises(RuntimeError, match="means must be 2-D"):
        class_fold(counts, means[0], pending, sums[0], sqsums, sqdev)


def test_opcheck(device):
    state = _state(20, 6, device, torch.float32)
    torch.library.opcheck(torch.ops.collapse_ext.class_fold.default, tuple(state))


def test_compiles_under_torch_compile(device):
    """Accumulate and fold in one compiled graph (the ops' fake kernels), as a fused
    training step would; same state as eager."""
    from collapse_ext import class_accumulate

    g = torch.Generator().manual_seed(6)
    x = (torch.randn(64, 8, generator=g) + 100).to(device)
    y = torch.randint(0, 5, (64,), generator=g).to(device)

    def step(x, y, state):
        _, status = class_accumulate(x, y, state[0], state[1], state[2], state[3], state[4], 1e30, False)
        class_fold(*state)
        return status

    states = [_state(5, 8, device, torch.float32, seed=7, offset=100.0) for _ in range(2)]
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert compiled(x, y, states[0])[0] == 1 and step(x, y, states[1])[0] == 1
    for a, b in zip(*states):
        assert torch.equal(a, b)
