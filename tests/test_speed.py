"""Speed and memory modes: a compiled U-Net (`compile=True`, `--compile`) and offloaded weights
(`offload="model" | "sequential"`, `--offload`).

On a CPU-only machine these check that the mechanisms are right (same images, one compile per
size, weights on the execution device only while they run); the speed and memory they buy on a
GPU are measured by benchmarks/gpu_generate.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_components

from sdxl.acceleration import Offload, compile_unet, execution_device, is_compiled
from sdxl.checkpoints.load import Components
from sdxl.checkpoints.save import save_single_file
from sdxl.interfaces import cli
from sdxl.models import unet
from sdxl.models.tokenizer import clip_l_tokenizer
from sdxl.models.unet import UNet, UNetConfig
from sdxl.pipeline import Pipeline

pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")

PROMPT = "a red circle on a blue square"
SETTINGS = dict(width=32, height=24, steps=2, seed=3)

# One level, one transformer block: the smallest SDXL-shaped U-Net, so that a cold inductor compile
# on the CPU takes seconds rather than minutes. It fits the tiny text encoders (context 96, pooled 64).
MICRO = UNetConfig(
    model_channels=16, channel_mult=(1,), num_res_blocks=1, transformer_depth=(1,), transformer_depth_middle=None,
    num_heads=(1,), context_dim=96, adm_in_channels=64 + 6 * 32, addition_time_embed_dim=32, norm_groups=8,
    sample_size=8,
)


def components(unet_config: UNetConfig = unet.tiny) -> Components:
    return tiny_components("base", unet=unet_config, randomized=True)


def models(parts: Components) -> list[torch.nn.Module]:
    return [parts.text_encoder, parts.text_encoder_2, parts.unet, parts.vae]


def hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


# ---------------------------------------------------------------------------------------------
# compile


def test_compiled_unet_gives_the_eager_images_and_compiles_once_per_size():
    from torch._dynamo.exc import RecompileError
    import torch._inductor.config as inductor

    parts = components(MICRO)
    eager = Pipeline(parts)
    expected = eager.generate(PROMPT, output="latent", **SETTINGS)
    expected_2 = eager.generate("another prompt", output="latent", **dict(SETTINGS, seed=8))

    torch._dynamo.reset()
    pipe = Pipeline(parts, compile=True)
    assert is_compiled(parts.unet) and pipe.base.unet is parts.unet  # the same module, its forward compiled
    graphs = counters["stats"]["unique_graphs"]
    try:
        # Scalar C++ kernels compile in about half the time of vectorised ones; what is checked here
        # (one graph per size, the eager numbers) does not depend on the vector ISA.
        with inductor.patch({"cpp.vec_isa_ok": False}):
            first = pipe.generate(PROMPT, output="latent", **SETTINGS)
            assert counters["stats"]["unique_graphs"] == graphs + 1  # fullgraph: the whole U-Net is one graph
            with torch._dynamo.config.patch(error_on_recompile=True):
                # Another prompt and seed at the same size runs the graph already compiled...
                second = pipe.generate("another prompt", output="latent", **dict(SETTINGS, seed=8))
                # ... while another size would need a new one (the guard that fires here is what a
                # recompilation of the same size would hit).
                with pytest.raises(RecompileError):
                    pipe.generate(PROMPT, output="latent", **dict(SETTINGS, width=40))
        assert counters["stats"]["unique_graphs"] == graphs + 1
    finally:
        torch._dynamo.reset()
    # Inductor reorders float32 arithmetic, so equal within float32 rounding, not bit for bit.
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, expected_2, rtol=1e-4, atol=1e-5)
    assert (first - expected).abs().max() < 1e-4 * expected.abs().max()


def test_compiling_twice_keeps_the_first_compilation_and_sequential_offload_refuses_it():
    model = UNet(MICRO)
    compile_unet(model)
    compiled = model.forward
    assert compile_unet(model).forward is compiled
    with pytest.raises(ValueError, match="compile and sequential offload do not combine"):
        Pipeline(components(MICRO), compile=True, offload="sequential")
    with pytest.raises(ValueError, match="offload must be one of model, sequential"):
        Pipeline(components(MICRO), offload="gpu")


# ---------------------------------------------------------------------------------------------
# offload


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_to_the_storage_device_gives_identical_images_and_hooks_come_off(mode):
    parts = components()
    expected = Pipeline(parts).generate(PROMPT, output="np", **SETTINGS)
    te, te2, u, v = models(parts)

    pipe = Pipeline(parts, offload=mode, device="cpu")  # execution device = storage device: nothing moves
    if mode == "model":  # hooks where a call enters a component; the VAE is entered through its children
        assert {m for c in models(parts) for m in c.modules() if hooked(m)} == {te, te2, u, *v.children()}
    else:  # every module that holds weights of its own, and only those
        for c in models(parts):
            for m in c.modules():
                assert hooked(m) == any(True for _ in m.parameters(recurse=False)), m
    assert pipe.device == execution_device(u) == torch.device("cpu")
    got = pipe.generate(PROMPT, output="np", **SETTINGS)
    np.testing.assert_array_equal(got, expected)
    assert pipe.offload.resident is None  # nothing left on the device after a call

    pipe.offload.remove()
    assert not any(hooked(m) for c in models(parts) for m in c.modules())
    assert not any("_offload" in c.__dict__ for c in models(parts))
    np.testing.assert_array_equal(Pipeline(parts).generate(PROMPT, output="np", **SETTINGS), expected)


def where(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


def test_model_offload_runs_one_component_at_a_time_and_copies_nothing_back():
    # The meta device stands in for a GPU: a real second device, with no memory behind it.
    parts = components()
    te, te2, u, v = models(parts)
    ptrs = {id(p): p.data_ptr() for c in models(parts) for p in c.parameters()}
    offload = Offload("model", "meta", models(parts))
    seen = {}
    u.register_forward_pre_hook(lambda m, args: seen.update(unet=where(u), text=where(te) | where(te2)))

    tokens = clip_l_tokenizer()(["a cat"])
    hidden, _ = te(tokens.to("meta"), pooled=False)
    assert hidden.device.type == "meta" and offload.resident is te and where(te) == {"meta"}
    x, t = torch.zeros(2, 4, 8, 8, device="meta"), torch.zeros((), device="meta")
    out = u(x, t, torch.zeros(2, 77, 96, device="meta"), torch.zeros(2, u.config.adm_in_channels, device="meta"))
    assert out.shape == (2, 4, 8, 8) and out.device.type == "meta"
    assert seen == {"unet": {"meta"}, "text": {"cpu"}}  # the text encoder left when the U-Net came in
    assert offload.resident is u and execution_device(u) == torch.device("meta")
    image = v.decode(torch.zeros(1, 4, 8, 8, device="meta"))  # the VAE has no forward: entered through a child
    assert image.shape == (1, 3, 64, 64) and offload.resident is v and where(u) == {"cpu"}

    offload.unload()
    assert all(where(c) == {"cpu"} for c in models(parts))
    # Dropping a device copy points the weights back at their CPU tensors: no copy back, no new memory.
    assert all(p.data_ptr() == ptrs[id(p)] for c in models(parts) for p in c.parameters())


def test_sequential_offload_holds_one_layer_at_a_time():
    parts = components()
    u = parts.unet
    ptrs = {id(p): p.data_ptr() for p in u.parameters()}
    Offload("sequential", "meta", [u])
    conv_in, conv_out = u.input_blocks[0][0], u.out[2]
    seen = []
    # Registered after the offload's hook, so it sees the weights as the layer's forward does.
    conv_out.register_forward_pre_hook(lambda m, args: seen.append((where(conv_out), where(conv_in), where(u.time_embed))))
    out = u(torch.zeros(2, 4, 8, 8, device="meta"), torch.zeros((), device="meta"),
            torch.zeros(2, 77, 96, device="meta"), torch.zeros(2, u.config.adm_in_channels, device="meta"))
    assert out.device.type == "meta"
    assert seen == [({"meta"}, {"cpu"}, {"cpu"})]
    assert where(u) == {"cpu"} and all(p.data_ptr() == ptrs[id(p)] for p in u.parameters())


def test_offloading_a_component_twice_is_refused():
    parts = components()
    Offload("model", "cpu", [parts.unet])
    with pytest.raises(ValueError, match="already offloaded"):
        Offload("sequential", "cpu", [parts.unet])


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_offload_gives_the_same_pixels_and_flags_reach_the_loader(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import sdxl.pipeline

    path = tmp_path / "tiny.safetensors"
    save_single_file(components(), path, dtype=torch.float32)
    common = ["generate", PROMPT, "--model", str(path), "--width", "32", "--height", "24", "--steps", "2"]
    assert cli.main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert cli.main([*common, "--offload", "sequential", "--out", str(tmp_path / "offloaded.png")]) == 0
    plain, offloaded = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "offloaded"))
    np.testing.assert_array_equal(offloaded, plain)

    capsys.readouterr()
    assert cli.main([*common, "--compile", "--offload", "sequential", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("sdxl generate: error: compile and sequential offload do not combine")
    assert "Traceback" not in err

    calls = []

    def fake_load(*args, **kwargs):
        calls.append(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(sdxl.pipeline, "load", fake_load)
    assert cli.main([*common, "--compile", "--offload", "model", "--device", "cpu", "--out", str(tmp_path / "y.png")]) == 2
    assert calls[0]["compile"] is True and calls[0]["offload"] == "model" and calls[0]["device"] == "cpu"
    assert cli.main([*common, "--out", str(tmp_path / "z.png")]) == 2
    assert calls[1]["compile"] is False and calls[1]["offload"] is None


# ---------------------------------------------------------------------------------------------
# fp8 weight storage


def test_fp8_linear_keeps_the_layer_within_float8_rounding():
    from sdxl.acceleration import FP8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row stays exactly zero (its scale is not 0 / 0)
    fp8 = FP8Linear(linear)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_fp8.shape == (48, 64)
    assert fp8.weight_fp8.element_size() * fp8.weight_fp8.numel() == linear.weight.numel()  # 1 byte a weight
    x = torch.randn(5, 64)
    with torch.no_grad():
        want, got = linear(x), fp8(x)
    assert torch.all(got[:, 3] == linear.bias[3])
    error = (got - want).norm() / want.norm()
    assert 1e-4 < error < 0.05, error  # e4m3 keeps 3 mantissa bits: ~2% per weight, less after the sums


def test_fp8_pipeline_halves_the_unets_linear_memory_and_keeps_the_image(tmp_path, monkeypatch):
    from sdxl.acceleration import FP8Linear

    plain = Pipeline(components())
    fp8 = Pipeline(components(), fp8=True)
    layers = [m for m in fp8.base.unet.modules() if isinstance(m, FP8Linear)]
    assert layers and not any(type(m) is torch.nn.Linear for m in fp8.base.unet.modules())

    def unet_bytes(p: Pipeline) -> int:
        return sum(t.numel() * t.element_size() for t in [*p.base.unet.parameters(), *p.base.unet.buffers()])

    linear = sum(m.weight.numel() for m in plain.base.unet.modules() if type(m) is torch.nn.Linear)
    assert unet_bytes(plain) - unet_bytes(fp8) >= 0.95 * linear * 3  # float32 -> float8: 3 of 4 bytes saved
    a = plain.generate(PROMPT, output="np", **SETTINGS)
    b = fp8.generate(PROMPT, output="np", **SETTINGS)
    difference = float(np.abs(a - b).mean())
    assert 0 < difference < 0.02, difference  # mean over pixels in [0, 1]: close, not equal

    # The command line: --fp8 reaches the loader and is stored with the image (it changes the pixels).
    from PIL import Image

    from sdxl.interfaces import metadata

    path = tmp_path / "tiny.safetensors"
    save_single_file(components(), path, dtype=torch.float32)
    common = ["generate", PROMPT, "--model", str(path), "--width", "32", "--height", "24", "--steps", "2"]
    assert cli.main([*common, "--fp8", "--out", str(tmp_path / "fp8.png")]) == 0
    assert metadata.read_settings(tmp_path / "fp8.png")["fp8"] is True
    assert cli.main(["generate", "--from-image", str(tmp_path / "fp8.png"), "--out", str(tmp_path / "again.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")),
                                  np.asarray(Image.open(tmp_path / "fp8.png")))
