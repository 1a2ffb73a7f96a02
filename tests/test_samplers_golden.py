"""The samplers without a full reference implementation here (ipndm, restart, euler_cfg_pp, euler_ancestral_cfg_pp,
tcd's gamma, the seeds' determinism) against what defines them, and every sampler on every schedule.

References: iPNDM's Adams-Bashforth steps are linear multistep steps on equal sigma steps, so on a uniform grid
ipndm equals LMS (checked against k-diffusion in test_samplers_kdiffusion.py); restart is Heun on
AUTOMATIC1111's step list (rebuilt here by hand); CFG++'s step is the paper's DDIM form (Chung et al. 2024,
eq. 8: x' = sqrt(a') x0_guided + sqrt(1 - a') eps_uncond, in VP); TCD with gamma = 0 is DDIM. Golden values
pin the seeded results (computed with this implementation; any change to the numerics must update them).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_samplers_kdiffusion import keyed_noise, toy_model

from sdxl.sampling import SAMPLERS, SCHEDULES, Denoiser, TrainingSchedule, make_plan, sample
from sdxl.sampling.samplers import SAMPLER_FUNCTIONS, STOCHASTIC, sample_heun

TRAINING = TrainingSchedule()
ALPHAS = TRAINING.alphas_cumprod().float()
C = 0.5  # data std of the Gaussian test problem


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact x0-predictor for data ~ N(0, C^2)."""
    return x * (C**2 / (C**2 + sigma**2))


def uniform_sigmas(n: int, hi: float = 10.0, lo: float = 0.1) -> torch.Tensor:
    return torch.linspace(hi, lo, n + 1, dtype=torch.float64)


def x64(seed: int = 0, shape=(1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Deterministic samplers: the probability-flow ODE of Gaussian data, and their references


def ode_error(sampler: str, sigmas: torch.Tensor, **options) -> float:
    x = x64() * sigmas[0].item()
    out = SAMPLER_FUNCTIONS[sampler](gaussian, x, sigmas, **options)
    exact = x * ((C**2 + sigmas[-1].item() ** 2) / (C**2 + sigmas[0].item() ** 2)) ** 0.5
    return ((out - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("sampler,order", [("euler_cfg_pp", 1), ("dpm_2", 2), ("lms", 2), ("ipndm", 2),
                                           ("deis", 2), ("uni_pc", 2), ("uni_pc_bh2", 2)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    # log-uniform sigmas; the multistep methods' first-order warm-up step bounds their global order by 2
    log_sigmas = lambda n: torch.exp(torch.linspace(math.log(10.0), math.log(0.1), n + 1, dtype=torch.float64))
    errors = [ode_error(sampler, log_sigmas(n)) for n in (32, 64, 128)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(rates) > order - 0.25, (errors, rates)


def test_multistep_samplers_beat_first_order_ones():
    log_sigmas = torch.exp(torch.linspace(math.log(10.0), math.log(0.1), 33, dtype=torch.float64))
    names = ("euler", "dpmpp_2m", "deis", "uni_pc", "uni_pc_bh2", "lms")
    errors = {name: ode_error(name, log_sigmas) for name in names}
    assert errors["deis"] < errors["dpmpp_2m"] / 5 < errors["euler"] / 50, errors
    assert max(errors["uni_pc"], errors["uni_pc_bh2"], errors["lms"]) < errors["euler"] / 10, errors


def test_ipndm_is_linear_multistep_on_equal_steps():
    sigmas = uniform_sigmas(24)
    x = x64(1) * 10
    ipndm = SAMPLER_FUNCTIONS["ipndm"](toy_model, x, sigmas)
    lms = SAMPLER_FUNCTIONS["lms"](toy_model, x, sigmas, order=4)
    assert (ipndm - lms).abs().max().item() < 1e-11
    for max_order in (1, 2, 3):
        a = SAMPLER_FUNCTIONS["ipndm"](toy_model, x, sigmas, max_order=max_order)
        b = SAMPLER_FUNCTIONS["lms"](toy_model, x, sigmas, order=max_order)
        assert (a - b).abs().max().item() < 1e-11
    # and on unequal steps it keeps its fixed coefficients (not LMS's)
    karras = make_plan(TRAINING, "ipndm", "karras", 12).sigmas.double()
    run = SAMPLER_FUNCTIONS
    assert (run["ipndm"](toy_model, x, karras) - run["lms"](toy_model, x, karras)).abs().max() > 1e-3


def test_ipndm_last_step_to_zero_is_the_prediction():
    plan = make_plan(TRAINING, "ipndm", "karras", 8)
    seen = []
    out = SAMPLER_FUNCTIONS["ipndm"](toy_model, x64(), plan.sigmas.double(), callback=lambda i, x, d: seen.append(d))
    assert torch.equal(out, seen[-1])


@pytest.mark.parametrize("schedule", ["simple", "ddim_uniform", "normal", "beta", "polyexponential", "kl_optimal",
                                      "align_your_steps"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim", "dpm_2", "lms", "deis", "uni_pc_bh2"])
def test_deterministic_samplers_solve_the_ode_on_the_new_schedules(sampler, schedule):
    # as test_sampling.py's test on the first five schedules, down to the last nonzero sigma
    errors = []
    for steps in (30, 100):
        plan = make_plan(TRAINING, sampler, schedule, steps)
        sigmas = plan.sigmas[:-1].double()
        extra = {"sigmas_to": plan.sigmas_to[:-1]} if plan.sigmas_to is not None and sampler == "ddim" else {}
        errors.append(ode_error(sampler, sigmas, **extra))
    assert errors[1] < 0.03 and errors[1] < errors[0], errors


# ---------------------------------------------------------------------------------------------
# CFG++


def pair_model(x: torch.Tensor, sigma: float):
    """(guided, unconditional) x0 predictions that differ."""
    return toy_model(x, sigma), toy_model(x * 0.8, sigma * 1.1) + 0.05


def test_euler_cfg_pp_is_the_papers_ddim_step():
    plan = make_plan(TRAINING, "euler_cfg_pp", "default", 8)
    s = plan.sigmas.tolist()
    x = x64(2) * s[0]
    out = SAMPLER_FUNCTIONS["euler_cfg_pp"](pair_model, x, plan.sigmas)
    ref = x / (1 + s[0] ** 2) ** 0.5  # VP
    for i in range(len(s) - 1):
        x_ve = ref * (1 + s[i] ** 2) ** 0.5
        guided, uncond = pair_model(x_ve, s[i])
        a_next = 1 / (1 + s[i + 1] ** 2)
        eps_uncond = (x_ve - uncond) / s[i]
        ref = a_next**0.5 * guided + (1 - a_next) ** 0.5 * eps_uncond
    assert (out - ref).abs().max().item() < 1e-12  # final sigma 0: VP = VE


def test_cfg_pp_samplers_without_an_unconditional_prediction_are_euler():
    sigmas = make_plan(TRAINING, "euler", "karras", 10).sigmas.double()
    x = x64(3) * 10
    assert torch.equal(SAMPLER_FUNCTIONS["euler_cfg_pp"](toy_model, x, sigmas),
                       SAMPLER_FUNCTIONS["euler_cfg_pp"](lambda x, s: (toy_model(x, s),) * 2, x, sigmas))
    run = SAMPLER_FUNCTIONS
    assert (run["euler_cfg_pp"](toy_model, x, sigmas) - run["euler"](toy_model, x, sigmas)).abs().max() < 1e-12
    ns = keyed_noise((1, 4, 8, 8))
    a = SAMPLER_FUNCTIONS["euler_ancestral_cfg_pp"](toy_model, x, sigmas, noise_sampler=ns)
    b = SAMPLER_FUNCTIONS["euler_ancestral"](toy_model, x, sigmas, noise_sampler=ns)
    assert (a - b).abs().max() < 1e-12
    # with the unconditional prediction the step differs, and eta = 0 is the deterministic sampler
    assert (run["euler_cfg_pp"](pair_model, x, sigmas) - run["euler"](toy_model, x, sigmas)).abs().max() > 1e-2
    assert torch.equal(SAMPLER_FUNCTIONS["euler_ancestral_cfg_pp"](pair_model, x, sigmas, eta=0.0),
                       SAMPLER_FUNCTIONS["euler_cfg_pp"](pair_model, x, sigmas))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoiser_returns_the_pair_when_the_model_offers_it(prediction):
    training = TrainingSchedule(prediction_type=prediction)
    plan = make_plan(training, "euler_cfg_pp", "default", 6)
    single = Denoiser(lambda x_in, t: torch.tanh(x_in) * 0.3, training, plan)
    other = Denoiser(lambda x_in, t: torch.sin(x_in) * 0.2, training, plan)
    both = Denoiser(lambda x_in, t: (torch.tanh(x_in) * 0.3, torch.sin(x_in) * 0.2), training, plan)
    x = x64(4).float() * 3
    sigma = plan.sigmas[2].item()
    guided, uncond = both(x, sigma)
    assert torch.equal(guided, single(x, sigma)) and torch.equal(uncond, other(x, sigma))
    guided_b, uncond_b = both(x.expand(2, -1, -1, -1), torch.tensor([sigma, sigma]))  # per-sample sigmas
    torch.testing.assert_close(guided_b[1], guided[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond_b[0], uncond[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# restart, tcd


def automatic1111_restart(model, x, sigmas: torch.Tensor, noise_sampler, steps: int, times: int):
    """AUTOMATIC1111's restart loop over the plan's sigmas, its step list built by hand: Heun steps; after the step
    reaching the sigma nearest 0.1, re-noise to the sigma nearest 2 and come down again on Karras sigmas."""
    s = sigmas.tolist()
    low = min(range(len(s)), key=lambda k: abs(s[k] - 0.1))
    high = min(range(len(s)), key=lambda k: abs(s[k] - 2.0))
    rho = 7.0
    ramp = [k / steps for k in range(steps + 1)]
    restart = [(s[high] ** (1 / rho) + r * (s[low] ** (1 / rho) - s[high] ** (1 / rho))) ** rho for r in ramp]
    pairs = [(s[i], s[i + 1]) for i in range(len(s) - 1)]
    pairs[low:low] = [pair for _ in range(times) for pair in itertools.pairwise(restart)]
    last = None
    for a, b in pairs:
        if last is not None and last < a:
            x = x + noise_sampler(last, a) * (a**2 - last**2) ** 0.5
        x = sample_heun(model, x, torch.tensor([a, b], dtype=torch.float64))
        last = b
    return x


@pytest.mark.parametrize("steps,segment", [(24, (9, 1)), (40, (10, 2))])
def test_restart_is_automatic1111s_restart_loop(steps, segment):
    plan = make_plan(TRAINING, "restart", "karras", steps)
    sigmas = plan.sigmas.double()
    x = x64(5) * sigmas[0].item()
    calls = []

    def counted(x, sigma):
        calls.append(sigma)
        return toy_model(x, sigma)

    ns = keyed_noise((1, 4, 8, 8))
    ours = SAMPLER_FUNCTIONS["restart"](counted, x, sigmas, noise_sampler=ns, callback=lambda *a: calls.append("step"))
    theirs = automatic1111_restart(toy_model, x, sigmas, ns, *segment)
    assert (ours - theirs).abs().max().item() < 1e-7  # the Karras sigmas' last-bit rounding
    assert calls.count("step") == steps  # one callback per step of the plan
    heun_calls = 2 * steps - 1 + 2 * segment[0] * segment[1]
    assert len(calls) - steps == heun_calls
    # below 20 steps (AUTOMATIC1111's rule) restart is Heun
    short = make_plan(TRAINING, "restart", "karras", 12).sigmas.double()
    assert torch.equal(SAMPLER_FUNCTIONS["restart"](toy_model, x, short, noise_sampler=ns),
                       sample_heun(toy_model, x, short))


def test_restart_converges_to_the_data_distribution():
    errors = []
    for steps in (20, 80):
        plan = make_plan(TRAINING, "restart", "karras", steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 64, 64, generator=g) * (plan.sigmas[0].item() ** 2 + C**2) ** 0.5
        out = SAMPLER_FUNCTIONS["restart"](gaussian, x, plan.sigmas, generator=g)
        assert torch.isfinite(out).all() and abs(out.mean().item()) < 0.02
        errors.append(abs(out.std().item() - C))
    assert errors[1] < 0.01, errors


def test_tcd_without_its_landing_is_ddim_and_its_gamma_renoises():
    plan = make_plan(TRAINING, "tcd", "default", 6)
    x = x64(6) * plan.sigmas[0].item()
    ddim = SAMPLER_FUNCTIONS["ddim"](toy_model, x, plan.sigmas)
    assert (SAMPLER_FUNCTIONS["tcd"](toy_model, x, plan.sigmas) - ddim).abs().max() < 1e-12
    # the plan's landings are sigma(floor(0.7 t_next)): each step jumps below the next sigma and re-noises
    t_next = torch.cat([plan.timesteps[1:], torch.zeros(1)])
    assert torch.equal(plan.sigmas_to, TRAINING.sigmas()[(t_next * 0.7).floor().long()])
    assert bool((plan.sigmas_to[:-1] < plan.sigmas[1:-1]).all())


# ---------------------------------------------------------------------------------------------
# Seeds, batches, every pairing


def independent_rows(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """test_sampling.py's toy U-Net without its batch-wide term: each image of a batch on its own."""
    t = torch.as_tensor(t, dtype=torch.float32).clamp(0, 999)
    low = t.floor().long().clamp(max=998)
    a = torch.lerp(ALPHAS[low], ALPHAS[low + 1], t - low)
    return (1 - a).sqrt() * x_in + 0.2 * torch.tanh(1.3 * x_in + 0.1) * torch.sin(t / 173.0 + 0.3)


# sample() with the seeded generators [5, 6], 8 steps of "karras" ("default" for tcd): (mean, std, x[0, 0, 0, 0])
GOLDEN = {
    "euler_ancestral_cfg_pp": (0.01466, 0.65393, 0.65530),
    "dpm_2_ancestral": (-0.01301, 0.98188, 1.10560),
    "dpmpp_2s_ancestral": (0.00512, 0.78126, 0.73562),
    "dpmpp_2m_sde_heun": (-0.01353, 1.15116, 0.39961),
    "dpmpp_3m_sde": (0.01186, 1.38403, 1.11300),
    "tcd": (0.02543, 0.72694, 0.34705),
    "restart": (0.00749, 1.12612, 2.08165),
    "ipndm": (0.01041, 1.10656, 2.02861),
    "deis": (0.00823, 1.05894, 1.94742),
    "uni_pc": (0.02437, 1.42175, 2.52379),
    "euler_cfg_pp": (0.01323, 0.95252, 1.71110),
}


def run_seeded(sampler: str, seeds=(5, 6), schedule: str | None = None, steps: int = 8) -> torch.Tensor:
    schedule = schedule or ("default" if sampler in ("tcd", "lcm") else "karras")
    plan = make_plan(TRAINING, sampler, schedule, steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in gens])
    return sample(plan, Denoiser(independent_rows, TRAINING, plan), noise * plan.init_noise_sigma, generator=gens)


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC))
def test_seeded_stochastic_samplers_repeat_and_batch(sampler):
    a, b = run_seeded(sampler), run_seeded(sampler)
    assert torch.equal(a, b)  # CPU generators: the same image every run
    assert (run_seeded(sampler, (7, 6)) - a)[0].abs().max() > 1e-3  # another seed, another image
    for i, seed in enumerate((5, 6)):  # image i of a batch is the single image of its seed
        torch.testing.assert_close(run_seeded(sampler, (seed,)), a[i : i + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", sorted(GOLDEN))
def test_golden_values(sampler):
    out = run_seeded(sampler)
    got = (out.mean().item(), out.std().item(), out[0, 0, 0, 0].item())
    assert got == pytest.approx(GOLDEN[sampler], abs=2e-5), got


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_on_every_schedule(sampler):
    for schedule in SCHEDULES:
        steps: list = []
        out = run_seeded(sampler, (1,), schedule, 6)
        plan = make_plan(TRAINING, sampler, schedule, 6)
        sample(plan, Denoiser(independent_rows, TRAINING, plan), torch.randn(1, 4, 8, 8) * plan.init_noise_sigma,
               generator=torch.Generator().manual_seed(1),
               callback=lambda i, n, x, d, seen=steps: seen.append((i, n, d.shape)))
        assert torch.isfinite(out).all() and 0.05 < out.std() < 5, (sampler, schedule)
        assert steps == [(i, plan.steps, (1, 4, 8, 8)) for i in range(plan.steps)]


def test_too_many_steps_for_a_log_step_sampler_is_a_clear_error():
    from sdxl.sampling import TrainingSchedule, make_plan

    training = TrainingSchedule.from_diffusers({})
    with pytest.raises(ValueError, match="1000 steps of the 'default' schedule repeat .* dpmpp_2m cannot take a step"):
        make_plan(training, "dpmpp_2m", "default", 1000)
    assert make_plan(training, "dpmpp_2m", "karras", 1000).steps == 1000  # distinct sigmas: fine
    assert make_plan(training, "euler", "default", 1000).steps == 1000  # a zero step is harmless for Euler
