import pytest
import torch
from helpers import needs_cuda, rel_err

from collapse_ext import lpm_step
from collapse_ext.reference import lpm_objective_grad_reference, lpm_step_reference


def _inputs(B, K, p, seed=0, dtype=torch.float64, device="cpu"):
    """A random state: iterates partly outside the balls, momentum mid-way, mixed weights."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, K, p, generator=g, dtype=torch.float64)
    H = torch.randn(B, K, p, generator=g, dtype=torch.float64)
    W_prev = W + 0.1 * torch.randn(B, K, p, generator=g, dtype=torch.float64)
    H_prev = H + 0.1 * torch.randn(B, K, p, generator=g, dtype=torch.float64)
    theta = 1 + 3 * torch.rand(B, generator=g, dtype=torch.float64)
    weights = torch.rand(B, K, generator=g, dtype=torch.float64)
    weights = weights / weights.sum(1, keepdim=True)
    E_W = 0.5 + torch.rand(B, generator=g, dtype=torch.float64)
    E_H = 0.5 + 4 * torch.rand(B, generator=g, dtype=torch.float64)
    step = 0.05 + 0.1 * torch.rand(B, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (W, H, W_prev, H_prev, theta, weights, E_W, E_H, step)]


def _compare(args, num_iters, loss, momentum, tol):
    out = lpm_step(*args, num_iters, loss, momentum)
    ref = lpm_step_reference(*[a.cpu() for a in args], num_iters, loss, momentum)
    assert len(out) == 7
    for name, a, r in zip(("W", "H", "W_prev", "H_prev", "theta", "objective", "pg_norm"), out, ref):
        assert a.dtype == args[0].dtype and a.device == args[0].device, name
        assert a.shape == r.shape, name
        assert rel_err(a, r) <= tol, (name, rel_err(a, r))
    return out


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("B,K,p", [(5, 4, 6), (3, 10, 10), (2, 7, 3), (1, 2, 1)])
def test_matches_reference_fp64(device, loss, momentum, B, K, p):
    args = _inputs(B, K, p, seed=B + K + p, device=device)
    _compare(args, 40, loss, momentum, 1e-10)


def test_matches_reference_fp32(device):
    args = _inputs(4, 6, 5, seed=3, dtype=torch.float32, device=device)
    # float32 arithmetic over 20 iterations against float64: a few hundred ulps at most.
    _compare(args, 20, "ce", True, 1e-4)


def test_large_instance_fp64(device):
    # K = p = 64 is the CUDA shared-memory design point (160 KiB in float64).
    args = _inputs(2, 64, 64, seed=5, device=device)
    _compare(args, 10, "ce", True, 1e-10)


def test_zero_iterations_evaluates_objective_and_gradient_mapping(device):
    args = _inputs(3, 5, 4, seed=7, device=device)
    W, H, W_prev, H_prev, theta, weights, E_W, E_H, step = args
    for loss in ("ce", "mse"):
        out = lpm_step(*args, 0, loss, True)
        assert torch.equal(out[0], W) and torch.equal(out[2], W_prev) and torch.equal(out[4], theta)
        f, gW, gH = lpm_objective_grad_reference(W.cpu(), H.cpu(), weights.cpu(), loss)
        assert rel_err(out[5], f) <= 1e-12
        # Inside both balls the gradient mapping is the gradient itself.
        W_in, H_in = 1e-3 * W, 1e-3 * H
        out = lpm_step(W_in, H_in, W_in, H_in, theta, weights, E_W, E_H, step, 0, loss, True)
        _, gW, gH = lpm_objective_grad_reference(W_in.cpu(), H_in.cpu(), weights.cpu(), loss)
        assert rel_err(out[6], torch.sqrt((gW**2).sum((1, 2)) + (gH**2).sum((1, 2)))) <= 1e-10


def test_iterates_stay_feasible_and_chunks_compose(device):
    args = _inputs(4, 5, 5, seed=11, device=device)
    W, H, W_prev, H_prev, theta, weights, E_W, E_H, step = args
    once = lpm_step(*args, 30, "ce", True)
    half = lpm_step(W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, 15, "ce", True)
    twice = lpm_step(*half[:5], weights, E_W, E_H, step, 15, "ce", True)
    for a, b in zip(once, twice):
        assert rel_err(a, b) <= 1e-13
    K = W.shape[1]
    assert ((once[0] ** 2).sum((1, 2)) / K <= E_W * (1 + 1e-12)).all()
    assert ((once[1] ** 2).sum((1, 2)) / K <= E_H * (1 + 1e-12)).all()


def test_pgd_decreases_objective_with_safe_step(device):
    from collapse_ext.lpm import lipschitz_bound

    args = _inputs(6, 5, 5, seed=13, device=device)
    W, H, W_prev, H_prev, theta, weights, E_W, E_H, _ = args
    K = W.shape[1]
    W = W / W.norm(dim=(1, 2), keepdim=True) * torch.sqrt(K * E_W)[:, None, None]
    H = H / H.norm(dim=(1, 2), keepdim=True) * torch.sqrt(K * E_H)[:, None, None]
    step = 1 / lipschitz_bound(weights, E_W, E_H, "ce")
    f = lpm_step(W, H, W, H, theta, weights, E_W, E_H, step, 0, "ce", False)[5]
    for _ in range(5):
        W, H, _, _, _, f_new, _ = lpm_step(W, H, W, H, theta, weights, E_W, E_H, step, 3, "ce", False)
        assert (f_new <= f + 1e-15).all()
        f = f_new


def test_empty_batch_and_non_contiguous(device):
    args = _inputs(0, 3, 4, device=device)
    out = lpm_step(*args, 5, "ce", True)
    assert out[0].shape == (0, 3, 4) and out[5].shape == (0,)
    args = _inputs(3, 4, 5, seed=17, device=device)
    wide = [torch.cat([a, a], dim=-1)[..., : a.shape[-1]] if a.dim() == 3 else a for a in args]
    transposed = [a.transpose(1, 2).contiguous().transpose(1, 2) if a.dim() == 3 else a for a in args]
    assert not wide[0].is_contiguous() and not transposed[0].is_contiguous()
    ref = lpm_step(*args, 10, "mse", True)
    for variant in (wide, transposed):
        for a, b in zip(lpm_step(*variant, 10, "mse", True), ref):
            assert torch.equal(a, b)


def test_opcheck(device):
    args = _inputs(3, 4, 5, seed=19, device=device)
    torch.library.opcheck(torch.ops.collapse_ext.lpm_step.default, (*args, 3, "ce", True))
    torch.library.opcheck(torch.ops.collapse_ext.lpm_step.default, (*args, 0, "mse", False))


def test_compiles_under_torch_compile(device):
    args = _inputs(3, 4, 5, seed=23, device=device)

    @torch.compile(fullgraph=True, backend="eager")
    def f(*a):
        W, H, *_, objective, pg_norm = lpm_step(*a, 5, "ce", True)
        return W * 2, objective

    W2, objective = f(*args)
    ref = lpm_step_reference(*[a.cpu() for a in args], 5, "ce", True)
    assert rel_err(W2, 2 * ref[0]) <= 1e-12 and rel_err(objective, ref[5]) <= 1e-12


def test_bad_input_messages(device):
    args = _inputs(2, 3, 4, device=device)
    W, H, W_prev, H_prev, theta, weights, E_W, E_H, step = args
    with pytest.raises(RuntimeError, match=r"W must be 3-D \(B, K, p\)"):
        lpm_step(W[0], H, W_prev, H_prev, theta, weights, E_W, E_H, step, 1)
    with pytest.raises(RuntimeError, match="W must be float32 or float64"):
        lpm_step(W.half(), H, W_prev, H_prev, theta, weights, E_W, E_H, step, 1)
    with pytest.raises(RuntimeError, match=r"H must have shape \(B, K, p\)"):
        lpm_step(W, H[:, :2], W_prev, H_prev, theta, weights, E_W, E_H, step, 1)
    with pytest.raises(RuntimeError, match="H_prev must have the dtype of W"):
        lpm_step(W, H, W_prev, H_prev.float(), theta, weights, E_W, E_H, step, 1)
    with pytest.raises(RuntimeError, match=r"weights must have shape \(B, K\)"):
        lpm_step(W, H, W_prev, H_prev, theta, weights[:, :2], E_W, E_H, step, 1)
    with pytest.raises(RuntimeError, match=r"step must have shape \(B,\)"):
        lpm_step(W, H, W_prev, H_prev, theta, weights, E_W, E_H, step[:1], 1)
    with pytest.raises(RuntimeError, match="num_iters must be >= 0"):
        lpm_step(*args, -1)
    with pytest.raises(RuntimeError, match='loss must be "ce" or "mse", got "hinge"'):
        lpm_step(*args, 1, "hinge")


@needs_cuda
def test_cuda_size_limit_message():
    args = _inputs(1, 65, 64, device="cuda")
    with pytest.raises(RuntimeError, match=r"K \* p <= 4096"):
        lpm_step(*args, 1)
