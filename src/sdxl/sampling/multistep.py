"""Multistep samplers: each step reuses the predictions of earlier steps (one model call per step).

The same conventions as `samplers.py` (VE latents, CPU sigmas read once as Python floats, no host syncs);
the coefficients are computed in Python floats from the sigmas, before any tensor arithmetic.
"""

from __future__ import annotations

import math

from torch import Tensor

from .noise import Generators, Model, NoiseSampler, StepCallback, default_noise_sampler


def sample_lms(model: Model, x: Tensor, sigmas: Tensor, *, order: int = 4,
               callback: StepCallback | None = None) -> Tensor:
    """Linear multistep in sigma on the probability-flow ODE (k-diffusion `sample_lms`; LMSDiscreteScheduler).

    The coefficients integrate the Lagrange polynomials through the last `order` derivatives exactly.
    """
    s = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        ds = [*ds[-(order - 1):], (x - denoised) / s[i]] if order > 1 else [(x - denoised) / s[i]]
        nodes = s[i - len(ds) + 1 : i + 1][::-1]  # sigma of ds[-1], ds[-2], ...
        for j, d in enumerate(reversed(ds)):
            x = x + d * _integrate_lagrange(nodes, j, s[i], s[i + 1])
        if callback is not None:
            callback(i, x, denoised)
    return x


def _integrate_lagrange(nodes: list[float], j: int, a: float, b: float) -> float:
    """Integral from a to b of the j-th Lagrange basis polynomial over `nodes` (exact, in u = tau - a)."""
    poly = [1.0]  # ascending powers of u
    for k, node in enumerate(nodes):
        if k != j:
            scale = 1.0 / (nodes[j] - node)
            poly = _poly_times_linear(poly, (a - node) * scale, scale)
    h = b - a
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))


def _poly_times_linear(poly: list[float], c0: float, c1: float) -> list[float]:
    """poly(u) * (c0 + c1 u), coefficients in ascending powers."""
    out = [0.0] * (len(poly) + 1)
    for p, c in enumerate(poly):
        out[p] += c * c0
        out[p + 1] += c * c1
    return out


def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2); diffusers DPMSolverMultistepScheduler."""
    s = sigmas.tolist()
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # the first-order step to sigma 0 (h = inf) lands on the prediction
        else:
            h = math.log(s[i] / s[i + 1])  # lambda = -log sigma (VE) = log(alpha / sigma) (VP)
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (s[i + 1] / s[i]) - denoised_d * math.expm1(-h)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`; diffusers "sde-dpmsolver++").

    solver_type "midpoint" (diffusers' default) or "heun" (`sample_dpmpp_2m_sde_heun`). The generator's noise is
    drawn every step, the last one included, as diffusers does (a noise_sampler is asked where noise is added).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    draw_last = noise_sampler is None  # the generator's draws follow diffusers': one on the last step too
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        noise = noise_sampler(s[i], s[i + 1]) if s[i + 1] > 0 or draw_last else None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)
            x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + denoised * decay
            if old_denoised is not None:
                r = h_last / h
                weight = 0.5 * decay if solver_type == "midpoint" else decay / (-h - eta_h) + 1
                x = x + (denoised - old_denoised) * (weight / r)
            if eta:
                x = x + noise * (s[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2m_sde_heun(model: Model, x: Tensor, sigmas: Tensor, **kwargs) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type second-order term (k-diffusion solver_type="heun"; diffusers
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun"))."""
    return sample_dpmpp_2m_sde(model, x, sigmas, solver_type="heun", **kwargs)


def sample_dpmpp_3m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion `sample_dpmpp_3m_sde`); noise drawn on the steps that add it."""
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    s = sigmas.tolist()
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            h_eta = h * (eta + 1)
            x = x * math.exp(-h_eta) + denoised * -math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + d1 * phi_2 - d2 * (phi_2 / h_eta - 0.5)
            elif h_1 is not None:
                x = x + (denoised - denoised_1) * (phi_2 / (h_1 / h))
            if eta:
                noise = noise_sampler(s[i], s[i + 1])
                x = x + noise * (s[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        if callback is not None:
            callback(i, x, denoised)
    return x


# Adams-Bashforth coefficients for equal steps, newest derivative first (orders 1-4)
_ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_ipndm(model: Model, x: Tensor, sigmas: Tensor, *, max_order: int = 4,
                 callback: StepCallback | None = None) -> Tensor:
    """Improved pseudo-numerical (iPNDM) sampling: Adams-Bashforth steps of orders 1..4 on the derivatives in
    sigma (Zhang & Chen 2023, arXiv:2204.13902; ComfyUI `sample_ipndm`, from zju-pi/diff-sampler)."""
    s = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        d = (x - denoised) / s[i]
        ds = [d, *ds][:max_order]  # newest first
        if s[i + 1] == 0:
            x = denoised
        else:
            coeffs = _ADAMS_BASHFORTH[len(ds) - 1]
            slope = sum((dj * c for dj, c in zip(ds[1:], coeffs[1:])), d * coeffs[0])
            x = x + slope * (s[i + 1] - s[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_deis(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 3,
    sigmas_to: Tensor | None = None,
    lower_order_final: bool | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DEIS-logrho multistep (Zhang & Chen 2023, arXiv:2204.13902; diffusers DEISMultistepScheduler): the
    exponential integrator in rho = sigma with eps interpolated by Lagrange polynomials in log rho.

    order: 1-3 (ComfyUI's DEIS order 3; diffusers' default 2). sigmas_to: where each step lands (default the
    next sigma; diffusers' last step lands at sigma(0), `Plan.sigmas_to`). lower_order_final: the last two
    steps drop to orders 1 and 2, as diffusers does for schedules under 15 steps (None: len(sigmas) - 1 < 15).
    """
    s = sigmas.tolist()
    n = len(s) - 1
    to = sigmas_to.tolist() if sigmas_to is not None else s[1:]
    lower = n < 15 if lower_order_final is None else lower_order_final
    eps: list[Tensor] = []  # newest first
    for i in range(n):
        denoised = model(x, s[i])
        eps = [(x - denoised) / s[i], *eps][:order]
        k = min(len(eps), 1 if lower and i == n - 1 else 2 if lower and i == n - 2 else order)
        nodes = [math.log(v) for v in s[i - k + 1 : i + 1][::-1]]  # log rho of eps[0], eps[1], ...
        for j in range(k):
            x = x + eps[j] * _deis_coefficient(nodes, j, s[i], to[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


def _deis_coefficient(nodes: list[float], j: int, rho_from: float, rho_to: float) -> float:
    """Integral over rho from rho_from to rho_to of L_j(log rho), L_j the Lagrange basis over `nodes` (log rhos).

    With u = log rho - log rho_from: rho_from * [e^u (P - P' + P'' - ...)] between 0 and log(rho_to / rho_from);
    0 at rho_to = 0.
    """
    poly = [1.0]  # L_j in ascending powers of u
    u0 = math.log(rho_from)
    for k, node in enumerate(nodes):
        if k != j:
            scale = 1.0 / (nodes[j] - node)
            poly = _poly_times_linear(poly, (u0 - node) * scale, scale)

    def antiderivative(u: float) -> float:  # e^u * sum_m (-1)^m P^(m)(u)
        total, deriv, sign = 0.0, poly, 1.0
        while deriv:
            total += sign * sum(c * u**p for p, c in enumerate(deriv))
            deriv, sign = [c * p for p, c in enumerate(deriv)][1:], -sign
        return math.exp(u) * total

    end = antiderivative(math.log(rho_to / rho_from)) if rho_to > 0 else 0.0
    return rho_from * (end - antiderivative(0.0))


def sample_uni_pc(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 3,
    variant: str = "bh1",
    steps_after: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC multistep predictor-corrector, data prediction (Zhao et al. 2023, arXiv:2302.04867; diffusers
    UniPCMultistepScheduler with solver_type = variant).

    order: the predictor's (ComfyUI runs 3; diffusers' default is 2); each step first corrects the previous
    step's result with the new prediction (UniC, no extra model call). steps_after: steps of the schedule after
    the last of these sigmas (a denoising_end cut): the order drops to the steps left to the schedule's end, as
    diffusers' lower_order_final does. The step to sigma 0 is first order (x = the prediction, the limit of the
    update; diffusers' "bh1" evaluates 0 * inf there and returns NaN).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    s = sigmas.tolist()
    n = len(s) - 1
    ms: list[Tensor] = []  # predictions, newest first
    last_x, last_order = None, 0
    for i in range(n):
        denoised = model(x, s[i])
        if last_x is not None:  # UniC: correct x_i with its own prediction
            x = _unipc_update(last_x, ms, s[i - 1 :: -1], s[i], last_order, variant, denoised)
        ms = [denoised, *ms][:order]
        last_order = min(order, n - i + steps_after, len(ms))
        last_x = x
        if s[i + 1] == 0:
            x = denoised
        else:  # UniP
            x = _unipc_update(x, ms, s[i::-1], s[i + 1], last_order, variant, None)
        if callback is not None:
            callback(i, x, denoised)
    return x


def _unipc_update(x: Tensor, ms: list[Tensor], past: list[float], sigma_to: float, order: int, variant: str,
                  corrector: Tensor | None) -> Tensor:
    """One UniP (corrector None) or UniC (corrector = the prediction at sigma_to) update of x from past[0] to
    sigma_to, with the predictions ms (newest first, at the sigmas past[0], past[1], ...); VE form of diffusers'
    `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` (x_t = sigma_t / sigma_s x - h phi_1 m0 - B(h) sum)."""
    sigma_s = past[0]
    h = math.log(sigma_s / sigma_to)  # lambda = -log sigma
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [math.log(sigma_s / past[k]) / h for k in range(1, order)]  # (lambda_k - lambda_s) / h
    ds = [(ms[k] - ms[0]) / rk for k, rk in zip(range(1, order), rks)]
    rks.append(1.0)
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for p in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r = [[rk ** (p - 1) for rk in rks] for p in range(1, order + 1)]
    x_t = x * (sigma_to / sigma_s) - ms[0] * h_phi_1
    if corrector is None:
        if not ds:
            return x_t
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in big_r[:-1]], b[:-1])
        return x_t - sum((d * rho for d, rho in zip(ds[1:], rhos[1:])), ds[0] * rhos[0]) * b_h
    rhos = [0.5] if order == 1 else _solve(big_r, b)
    res = (corrector - ms[0]) * rhos[-1]
    for d, rho in zip(ds, rhos):
        res = res + d * rho
    return x_t - res * b_h


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """The solution of the small linear system a y = b (Gaussian elimination with partial pivoting)."""
    n = len(b)
    m = [list(row) + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [v - f * w for v, w in zip(m[r], m[col])]
    y = [0.0] * n
    for r in range(n - 1, -1, -1):
        y[r] = (m[r][n] - sum(m[r][c] * y[c] for c in range(r + 1, n))) / m[r][r]
    return y


def sample_uni_pc_bh2(model: Model, x: Tensor, sigmas: Tensor, **kwargs) -> Tensor:
    """UniPC with B(h) = e^h - 1 (solver_type "bh2", diffusers' default; ComfyUI `uni_pc_bh2`)."""
    return sample_uni_pc(model, x, sigmas, variant="bh2", **kwargs)
