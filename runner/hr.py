"""Holistic robust (HR) worst-case weights in closed form (Bennouna, Lucas, Van Parys, ICML 2023).

The reference library (RyanLucas3/HR_Neural_Networks) solves, per batch, the conic program

    max_{p, q, s}  Σ_i p_i ℓ_i + p_{n+1} M        M = max_i ℓ_i
    s.t.  p, q in the simplex on n + 1 atoms;  q_i + s_i = 1/n,  s ≥ 0,  Σ s ≤ α;  Σ_j q_j log(q_j/p_j) ≤ r.

Here the same optimum is computed without a solver:
1. α-step: the best q takes mass α from the smallest losses (sorted ascending) and puts it on the extra
   atom, whose loss is M. That choice lowers Σ q_j log(η − ℓ_j) for every η at once, so it is optimal
   whatever the r-step does.
2. r-step: for fixed q the worst case is min_{η > M} η − e^{−r} Π_j (η − ℓ_j)^{q_j}; its optimum is the
   root of φ(η) = −r + Σ q_j log(η − ℓ_j) + log Σ q_j/(η − ℓ_j), which falls from +∞ (η → M⁺) to −r.
   The root is bracketed by doubling and then found by bisection.
3. p_j = λ q_j/(η* − ℓ_j) with λ = 1/Σ_k q_k/(η* − ℓ_k); the extra atom's weight goes to the argmax
   sample (they share the loss M).

Everything is vectorised over the batch and runs in float64 on the losses' device. The root finder works
with τ = η − M > 0 and the gaps a_j = M − ℓ_j ≥ 0, in the form
φ(τ) = −r + Σ q_j log1p(a_j/τ) + log Σ q_j/(1 + a_j/τ), which has no cancellation for large τ (small r)
and no overflow for tiny τ (large r).
"""

import math

import torch

# The bracket [τ, 2τ] shrinks to 2^-30 ≈ 1e-9 of τ; the weights move by about as much, far below the
# float32 resolution at which they enter the loss. (φ itself needs float64: its terms cancel for small r.)
BISECTION_STEPS = 30
SECTION_STEPS = 5  # bisection steps evaluated together: 31 points per round, 6 rounds
MAX_BRACKET_STEPS = 1100  # float64 spans 2^±1074: a root outside that is treated as its limit


def _check(losses: torch.Tensor, alpha: float, r: float) -> None:
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            f"HR expects a non-empty 1-D tensor of per-sample losses, got shape {tuple(losses.shape)}"
        )
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"method.alpha must be in [0, 1), got {alpha}")
    if not (0.0 <= r < math.inf):
        raise ValueError(f"method.r must be finite and >= 0, got {r}")
    if not bool(torch.isfinite(losses).all()):
        raise ValueError("HR weights need finite per-sample losses")


def alpha_step(sorted_losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """q on the ascending-sorted losses: α of the mass removed from the smallest, placed on the largest."""
    n = sorted_losses.numel()
    q = torch.full_like(sorted_losses, 1.0 / n)
    mass_before = torch.cumsum(q, 0) - q
    removed = torch.minimum((alpha - mass_before).clamp_min(0.0), q)
    q = q - removed
    q[-1] += alpha
    return q


def _phi(tau: torch.Tensor, q: torch.Tensor, gaps: torch.Tensor, r: float) -> torch.Tensor:
    """φ at each τ in `tau` (shape (k,)), from the sorted q and gaps (shape (n,))."""
    z = gaps / tau.unsqueeze(-1)
    return -r + (q * torch.log1p(z)).sum(-1) + torch.log((q / (1.0 + z)).sum(-1))


def _bracket(q: torch.Tensor, gaps: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, 2·lo] with φ(lo) ≥ 0 > φ(2·lo), by doubling (or halving) from the q-mean gap, the natural
    scale of the losses' spread. lo = 0 when the root lies below float64's range."""
    lo = hi = (q * gaps).sum().reshape(1)
    if _phi(lo, q, gaps, r) >= 0:
        for _ in range(MAX_BRACKET_STEPS):
            hi = lo * 2
            if _phi(hi, q, gaps, r) < 0:
                return lo, hi
            lo = hi
    else:
        for _ in range(MAX_BRACKET_STEPS):
            lo = hi / 2
            if lo == 0 or _phi(lo, q, gaps, r) >= 0:
                return lo, hi
            hi = lo
    raise FloatingPointError(f"HR: no root of phi within float64's range (method.r = {r})")


def _root(q: torch.Tensor, gaps: torch.Tensor, r: float) -> torch.Tensor:
    """τ* = η* − M > 0 with φ(τ*) = 0, by bisection inside the doubling bracket.

    BISECTION_STEPS halvings are done SECTION_STEPS at a time: φ is evaluated at once at the 2^s − 1
    interior dyadic points of the bracket and the sign change among them kept, which is the interval
    s successive bisections would reach, in one batch of tensor ops and with no host synchronisation.
    """
    lo, hi = _bracket(q, gaps, r)
    if lo.item() == 0:  # the root underflows: the worst case is the max itself
        return hi[0]
    fractions = torch.arange(2**SECTION_STEPS + 1, device=q.device, dtype=q.dtype) / 2**SECTION_STEPS
    for _ in range(BISECTION_STEPS // SECTION_STEPS):
        points = lo + (hi - lo) * fractions  # points[0] = lo (φ ≥ 0), points[-1] = hi (φ < 0)
        above = (_phi(points[1:-1], q, gaps, r) >= 0).sum(0, keepdim=True)  # φ is decreasing
        lo, hi = points.index_select(0, above), points.index_select(0, above + 1)
    return ((lo + hi) / 2)[0]


def hr_weights(losses: torch.Tensor, alpha: float, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The HR worst-case distribution over the batch and the HR loss value.

    Returns (p, value): p ≥ 0 sums to 1, aligned with `losses`, float64 on the losses' device (a constant:
    the gradient of HR is Σ p_i ∇ℓ_i by Danskin's theorem); value = Σ p_i ℓ_i, the HR objective.
    α = r = 0 gives the uniform weights (the mean); r = 0 the trimmed mean plus α·M; r → ∞ the max.
    """
    alpha, r = float(alpha), float(r)
    _check(losses, alpha, r)
    ell = losses.detach().to(torch.float64)
    sorted_losses, order = torch.sort(ell)
    q = alpha_step(sorted_losses, alpha)
    gaps = sorted_losses[-1] - sorted_losses
    spread = (q * gaps).sum()
    if r == 0.0 or spread == 0:  # no KL ball, or all mass already on the max: q is the worst case
        p_sorted = q
    else:
        tau = _root(q, gaps, r)
        unnormalised = q / (1.0 + gaps / tau)  # ∝ q_j/(η* − ℓ_j), scaled by τ to stay finite
        p_sorted = unnormalised / unnormalised.sum()
    p = torch.empty_like(p_sorted)
    p[order] = p_sorted
    return p, (p_sorted * sorted_losses).sum()


def weight_stats(p: torch.Tensor) -> dict:
    """Max weight and entropy (nats; log n for uniform weights): how concentrated the worst case is."""
    positive = p[p > 0]
    return {"hr/max_weight": p.max(), "hr/weight_entropy": -(positive * positive.log()).sum()}
