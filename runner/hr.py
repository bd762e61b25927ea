"""Holistic robust (HR) worst-case weights in closed form (Bennouna, Lucas, Van Parys, ICML 2023).

The reference library (RyanLucas3/HR_Neural_Networks) solves, per batch, the conic program

    max_{p, q, s}  Σ_i p_i ℓ_i + p_{n+1} M        M = max_i ℓ_i
    s.t.  p, q in the simplex on n + 1 atoms;  q_i + s_i = 1/n,  s ≥ 0,  Σ s ≤ α;  Σ_j q_j log(q_j/p_j) ≤ r.

Here the same optimum is computed without a solver:
1. α-step: the best q takes mass α from the smallest losses (in ascending order) and puts it on the extra
   atom, whose loss is M. That choice lowers Σ q_j log(η − ℓ_j) for every η at once, so it is optimal
   whatever the r-step does.
2. r-step: for fixed q the worst case is min_{η > M} η − e^{−r} Π_j (η − ℓ_j)^{q_j}; its optimum is the
   root of φ(η) = −r + Σ q_j log(η − ℓ_j) + log Σ q_j/(η − ℓ_j), which falls from +∞ (η → M⁺) to −r.
   The root is bracketed by doubling and then found by bisection (see `_root`).
3. p_j = λ q_j/(η* − ℓ_j) with λ = 1/Σ_k q_k/(η* − ℓ_k); the extra atom's weight goes to the argmax
   sample (they share the loss M).

Everything is vectorised over the batch and runs in float64 on the losses' device. The root finder works
with τ = η − M > 0 and the gaps a_j = M − ℓ_j ≥ 0, in the form
φ(τ) = −r + Σ q_j log1p(a_j/τ) + log Σ q_j/(1 + a_j/τ), which has no cancellation for large τ (small r)
and no overflow for tiny τ (large r).
"""

import functools
import math
import sys

import torch

# Bisection halves the bracket [τ, 2τ] BISECTION_STEPS times, SECTION_STEPS at a time: φ is evaluated at
# once at the 2^s + 1 dyadic points of the bracket and the sign change among them kept, which is the
# interval s successive bisections reach, in one batch of tensor ops without host synchronisation (the
# cost of this step is the number of tensor ops, not their size). The root is then read off the final
# bracket by linear interpolation of φ between its ends, whose error is quadratic in the bracket's width:
# about (2^-12)^2 ≈ 1e-7 of τ, so the weights agree with the exact optimum to ~1e-9.
BISECTION_STEPS = 12
SECTION_STEPS = 6  # 65 points per round, 2 rounds
DOUBLING_WINDOW = 16  # doublings (and halvings) of the bracket search evaluated together
MAX_BRACKET_STEPS = 2200  # float64 spans 2^±1074 around the start: beyond it there is no root to find


def _check(losses: torch.Tensor, alpha: float, r: float) -> None:
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            f"HR expects a non-empty 1-D tensor of per-sample losses, got shape {tuple(losses.shape)}"
        )
    check_parameters(alpha, r)


def check_parameters(alpha: float, r: float) -> None:
    """α in [0, 1) and a finite r >= 0 (r → ∞, where HR is the largest loss, is a limit, not a setting)."""
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"method.alpha must be in [0, 1), got {alpha}")
    if not (0.0 <= r < math.inf):
        raise ValueError(f"method.r must be finite and >= 0, got {r}")


def alpha_step(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """q: the uniform 1/n, less α of the mass taken from the smallest losses (⌊αn⌋ fully, the next one
    partially), plus α on the largest loss (the extra atom at M shares its loss)."""
    n = losses.numel()
    q = torch.full_like(losses, 1.0 / n)
    if alpha > 0:
        order = torch.argsort(losses)
        mass_before = torch.arange(n, device=losses.device, dtype=losses.dtype) / n  # in ascending order
        removed = (alpha - mass_before).clamp(0.0, 1.0 / n)
        q = q.index_put((order,), -removed, accumulate=True)
    q[losses.argmax()] += alpha
    return q


def _phi(tau: torch.Tensor, q: torch.Tensor, gaps: torch.Tensor, r: float) -> torch.Tensor:
    """φ at each τ in `tau` (shape (k,)), from q and the gaps (shape (n,)).

    With u_j = τ/(τ + a_j) ∈ (0, 1]: φ = −r − Σ q_j log u_j + log Σ q_j u_j (the form in the module
    docstring with log1p(a/τ) = −log u). A trimmed sample (q_j = 0) is kept out even where u_j underflows
    to 0 (log 0 = −∞ would make 0·log u NaN), as xlogy would; selecting before one matrix-vector product
    costs a third of xlogy's time on a CPU.
    """
    u = tau.unsqueeze(-1) / (tau.unsqueeze(-1) + gaps)
    return torch.log(u @ q) - torch.where(q > 0, torch.log(u), 0.0) @ q - r


@functools.lru_cache(maxsize=16)
def _grids(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The doubling window's exponents and the bisection's dyadic fractions, made once per device."""
    exponents = torch.arange(-DOUBLING_WINDOW, DOUBLING_WINDOW + 1, device=device, dtype=dtype)
    fractions = torch.arange(2**SECTION_STEPS + 1, device=device, dtype=dtype) / 2**SECTION_STEPS
    return exponents, fractions


def _bracket(q: torch.Tensor, gaps: torch.Tensor, r: float, scale: float) -> tuple[float, float]:
    """[lo, 2·lo] with φ(lo) ≥ 0 > φ(2·lo): the doubling search from `scale` (the q-mean gap, the losses'
    natural spread), its 2·DOUBLING_WINDOW + 1 doublings and halvings evaluated at once, the window moved
    on when the sign change lies beyond it. lo underflows (0 or subnormal) when the root is that small."""
    exponents, _ = _grids(q.device, q.dtype)
    shift = 0
    for _ in range(MAX_BRACKET_STEPS // DOUBLING_WINDOW):
        values = _phi(torch.exp2(exponents + shift) * scale, q, gaps, r)
        # φ is decreasing, so the points with φ ≥ 0 are a prefix; a τ that underflowed to 0 gives NaN
        # where φ is +∞.
        above = int((values.nan_to_num(nan=math.inf) >= 0).sum())
        if 0 < above < len(values):
            exponent = above - 1 - DOUBLING_WINDOW + shift
            return math.ldexp(scale, exponent), math.ldexp(scale, exponent + 1)
        shift += 2 * DOUBLING_WINDOW if above else -2 * DOUBLING_WINDOW
    raise FloatingPointError(f"HR: no root of phi within float64's range (method.r = {r})")


def _root(q: torch.Tensor, gaps: torch.Tensor, r: float, scale: float) -> torch.Tensor | float:
    """τ* = η* − M > 0 with φ(τ*) = 0: doubling bracket, bisection, interpolation in the last bracket."""
    lo, hi = _bracket(q, gaps, r, scale)
    if lo < sys.float_info.min:  # the root is below float64's normal range: the worst case is the max itself
        return hi
    _, fractions = _grids(q.device, q.dtype)
    ends = torch.tensor([lo, hi], device=q.device, dtype=q.dtype)
    for _ in range(BISECTION_STEPS // SECTION_STEPS):
        points = torch.lerp(ends[0], ends[1], fractions)  # the bracket's ends included: φ(lo) ≥ 0 > φ(hi)
        values = _phi(points, q, gaps, r)
        last_above = (values >= 0).sum(0, keepdim=True) - 1  # φ is decreasing
        pair = torch.cat([last_above, last_above + 1])
        ends, end_values = points.index_select(0, pair), values.index_select(0, pair)
    return ends[0] + (ends[1] - ends[0]) * end_values[0] / (end_values[0] - end_values[1])


def hr_weights(losses: torch.Tensor, alpha: float, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The HR worst-case distribution over the batch and the HR loss value.

    Returns (p, value): p ≥ 0 sums to 1, aligned with `losses`, float64 on the losses' device (a constant:
    the gradient of HR is Σ p_i ∇ℓ_i by Danskin's theorem); value = Σ p_i ℓ_i, the HR objective.
    α = r = 0 gives the uniform weights (the mean); r = 0 the trimmed mean plus α·M; r → ∞ the max.
    """
    alpha, r = float(alpha), float(r)
    _check(losses, alpha, r)
    ell = losses.detach().to(torch.float64)
    q = alpha_step(ell, alpha)
    gaps = ell.max() - ell
    spread = float(q @ gaps)  # the one host synchronisation before the bracket search; NaN if ℓ is not finite
    if not math.isfinite(spread):
        raise ValueError("HR weights need finite per-sample losses")
    if r == 0.0 or spread == 0.0:  # no KL ball, or all mass on the max: q is the worst case
        p = q
    else:
        tau = _root(q, gaps, r, spread)
        unnormalised = q / (1.0 + gaps / tau)  # ∝ q_j/(η* − ℓ_j), scaled by τ to stay finite
        p = unnormalised / unnormalised.sum()
    return p, (p * ell).sum()


def weight_stats(p: torch.Tensor) -> dict:
    """Max weight and entropy (nats; log n for uniform weights): how concentrated the worst case is."""
    return {"hr/max_weight": p.max(), "hr/weight_entropy": torch.special.entr(p).sum()}
