"""Every sampler k-diffusion has equals k-diffusion's own function (`k-diffusion` 0.1.1, test-only).

Both run the same x0-predictor on the same CPU float32 sigmas with the same noise sampler, which is a
function of the step's (sigma, sigma_next) only, so that the number and order of draws (ours follow diffusers
where a sampler has a diffusers twin) do not matter. k-diffusion computes its coefficients with float32 tensors,
we with Python floats: the results agree to float32 rounding (measured max abs error about 1e-6 on values of
order 1). The package's __init__ imports training extras (torchvision, wandb, ...), so its sampling.py and
utils.py are loaded by file path, with torchvision stubbed out for utils.py's image helpers (unused here).
Test-only packages: k-diffusion (--no-deps), torchsde, torchdiffeq, scipy.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from sdxl.sampling import TrainingSchedule, make_plan
from sdxl.sampling.samplers import SAMPLER_FUNCTIONS, STOCHASTIC

pytest.importorskip("scipy")
pytest.importorskip("torchsde")
pytest.importorskip("torchdiffeq")

SHAPE = (2, 4, 8, 8)
TOL = 1e-5  # float32 rounding of k-diffusion's tensor coefficients, accumulated over the steps
ERRORS: dict = {}  # max abs error per case (printed with -s)


def load_k_diffusion() -> types.ModuleType:
    """k_diffusion/sampling.py (with its utils.py) loaded as the package `_kdiffusion_ref`, without its __init__."""
    if "_kdiffusion_ref.sampling" in sys.modules:
        return sys.modules["_kdiffusion_ref.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = Path(spec.origin).parent
    package = types.ModuleType("_kdiffusion_ref")
    package.__path__ = [str(root)]
    sys.modules["_kdiffusion_ref"] = package
    stubs = {}
    try:
        import torchvision  # noqa: F401
    except ImportError:  # utils.py imports torchvision.transforms.functional for image helpers only
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stubs[name] = sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        for name in ("utils", "sampling"):
            module_spec = importlib.util.spec_from_file_location(f"_kdiffusion_ref.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            setattr(package, name, module)
    finally:
        for name in stubs:
            del sys.modules[name]
    return sys.modules["_kdiffusion_ref.sampling"]


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion()


def _sigma(sigma) -> float:
    return float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)


def toy_model(x: torch.Tensor, sigma) -> torch.Tensor:
    """A smooth, nonlinear, sigma-dependent x0-predictor (k-diffusion passes sigma as a (B,) tensor, we a float)."""
    s = _sigma(sigma)
    return x / (1 + s * s) + 0.3 * torch.tanh(1.7 * x + 0.2) * (math.sin(0.9 * s + 0.3) * s / (1 + s))


def keyed_noise(shape=SHAPE, salt: int = 0):
    """A noise sampler whose draw depends only on the step's (sigma, sigma_next), to 1% in log sigma."""

    def key(sigma) -> int:
        s = _sigma(sigma)
        return -(10**6) if s <= 0 else round(math.log(s) * 100)

    def noise_sampler(sigma, sigma_next):
        seed = (key(sigma) * 1_000_003 + key(sigma_next) * 7919 + salt) % (2**31)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    return noise_sampler


def plan_sigmas(schedule: str = "karras", steps: int = 12, **trim) -> torch.Tensor:
    return make_plan(TrainingSchedule(), "euler", schedule, steps, **trim).sigmas


KDIFFUSION = {  # our sampler id -> (k-diffusion function name, its extra keyword arguments)
    "euler": ("sample_euler", {}),
    "euler_ancestral": ("sample_euler_ancestral", {}),
    "heun": ("sample_heun", {}),
    "dpm_2": ("sample_dpm_2", {}),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {}),
    "lms": ("sample_lms", {}),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}),
    "dpmpp_sde": ("sample_dpmpp_sde", {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}),
}


def compare(kd, sampler: str, sigmas: torch.Tensor, label: str, **options):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * (sigmas[0].item() ** 2 + 1) ** 0.5
    name, extra = KDIFFUSION[sampler]
    if sampler in STOCHASTIC:
        options = {"noise_sampler": keyed_noise(), **options}
    theirs_denoised, ours_denoised = [], []
    theirs = getattr(kd, name)(toy_model, x, sigmas, disable=True, **extra, **options,
                               callback=lambda info: theirs_denoised.append(info["denoised"]))
    ours = SAMPLER_FUNCTIONS[sampler](toy_model, x, sigmas, **options,
                                      callback=lambda i, x, denoised: ours_denoised.append(denoised))
    err = (ours - theirs).abs().max().item()
    ERRORS[(sampler, label)] = err
    assert err <= TOL, f"{sampler} {label}: max abs error {err:.3g}"
    assert theirs.abs().max() > 0.1 and torch.isfinite(ours).all()
    if sampler not in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"):
        # one prediction per step (two-call samplers: ours is each step's first, as k-diffusion's callback)
        assert len(ours_denoised) == len(theirs_denoised) == len(sigmas) - 1
    for a, b in zip(ours_denoised, theirs_denoised):
        assert (a - b).abs().max().item() <= TOL
    return ours, theirs


@pytest.mark.parametrize("sampler", list(KDIFFUSION))
def test_equals_k_diffusion_on_karras_sigmas(kd, sampler):
    compare(kd, sampler, plan_sigmas("karras", 12), "karras-12")


@pytest.mark.parametrize("sampler", list(KDIFFUSION))
def test_equals_k_diffusion_on_a_cut_schedule(kd, sampler):
    # a base model's hand-off: the last sigma is not 0 (no final denoising step)
    sigmas = plan_sigmas("default", 20, denoising_end=0.7)
    assert sigmas[-1] > 0.5
    compare(kd, sampler, sigmas, "default-20-cut")


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                     "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_eta_and_s_noise_equal_k_diffusion(kd, sampler):
    ours, _ = compare(kd, sampler, plan_sigmas("exponential", 10), "eta0.5", eta=0.5, s_noise=0.8)
    other, _ = compare(kd, sampler, plan_sigmas("exponential", 10), "eta1", eta=1.0, s_noise=1.0)
    assert (ours - other).abs().max() > 1e-2  # the options reach the noise


def test_lms_order_equals_k_diffusion(kd):
    for order in (1, 2, 3):
        compare(kd, "lms", plan_sigmas("karras", 9), f"order{order}", order=order)


def test_dpmpp_sde_with_k_diffusions_brownian_noise(kd):
    # the sampler k-diffusion defaults to (a Brownian tree) fits ours as a noise_sampler
    sigmas = plan_sigmas("karras", 10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0].item()
    tree = lambda: kd.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=7)
    for sampler, name in (("dpmpp_2m_sde", "sample_dpmpp_2m_sde"), ("dpmpp_3m_sde", "sample_dpmpp_3m_sde")):
        theirs = getattr(kd, name)(toy_model, x, sigmas, disable=True, noise_sampler=tree())
        ours = SAMPLER_FUNCTIONS[sampler](toy_model, x, sigmas, noise_sampler=tree())
        assert (ours - theirs).abs().max().item() <= TOL
