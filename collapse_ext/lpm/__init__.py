"""Layer-Peeled Model (SPEC: "Layer-Peeled Model"; Fang, He, Long, Su, PNAS 2021).

Peel off the last layer and treat the features as free variables with a norm budget:

    minimise  sum_k c_k L(W h_k, k)
    s.t.      (1/K) sum_k ||w_k||^2 <= E_W,   (1/K) sum_k ||h_k||^2 <= E_H,

the class-collapsed form, with c_k = n_k / N * loss_weight_k (``loss_weights``
reweight or oversample a class's loss term, never its constraint weight), L the cross
entropy logsumexp(z) - z_k ("ce") or the squared error 0.5 ||z - e_k||^2 to one-hot
targets ("mse"), W (K, p) classifier rows, h_k (p,) features, p = ``dim``.

The solver is projected gradient descent on (W, H), plain ("pgd") or accelerated ("apgd":
FISTA momentum of Beck & Teboulle 2009 with the gradient restart of O'Donoghue & Candes
2015), run for a batch of independent instances at once by the fused ``lpm_step`` op
(CPU and CUDA; ``backend="reference"`` runs the same iteration in plain PyTorch). The
projection onto each constraint is a radial rescale of the whole block. Step size: 1 / L
with L a bound on the Lipschitz constant of the gradient over the feasible set
(``lipschitz_bound``); each chunk of iterations whose objective went up is undone and
retried with half the step (backtracking). Stopping: projected-gradient (gradient
mapping) norm <= ``tol``, or objective change over a chunk <= ``ftol`` * max(1, |f|).
Converged instances are frozen while the others continue.

What the solver reproduces (tests/test_lpm.py):
- balanced CE, p >= K - 1: W rows form a simplex ETF, ||w_k|| = sqrt(E_W),
  ||h_k|| = sqrt(E_H), h_k parallel to w_k; only E_W E_H matters;
- Minority Collapse past a finite imbalance ratio, and its removal by oversampling;
- balanced MSE (no bias), p >= K, E_W E_H < 1: W rows are an orthogonal frame (pairwise
  cosine 0), ||w_k|| = sqrt(E_W), h_k = sqrt(E_H / E_W) w_k and W h_k = sqrt(E_W E_H) e_k.
  (The nuclear norm of H W^T is at most K sqrt(E_W E_H), and the closest such matrix to
  the identity is sqrt(E_W E_H) I.) For E_W E_H >= 1 the objective reaches 0 and the
  minimiser is not unique, so no geometry is implied.

Modules: ``problem`` (objective, projection, Lipschitz bound, KKT residual, closed forms),
``solver`` (the batched class-collapsed solver), ``full`` (the per-sample model),
``sweep`` (Minority Collapse over imbalance ratios and its threshold).
"""

from .full import FullLPMResult, solve_full
from .large import LargeLPMResult, solve_large
from .problem import balanced_prediction, kkt_residual, lipschitz_bound, objective_grad, simplex_etf
from .solver import LPMResult, solve
from .sweep import SweepResult, estimate_threshold, minority_collapse_sweep, minority_stats

__all__ = [
    "LargeLPMResult",
    "solve_large",
    "FullLPMResult",
    "LPMResult",
    "SweepResult",
    "balanced_prediction",
    "estimate_threshold",
    "kkt_residual",
    "lipschitz_bound",
    "minority_collapse_sweep",
    "minority_stats",
    "objective_grad",
    "simplex_etf",
    "solve",
    "solve_full",
]
