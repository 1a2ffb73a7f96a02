"""sdxl.training.vae_fp16: a VAE made to overflow float16 (function-preserving, as the official SDXL VAE's
decoder does on real latents) is fixed: finite in float16, the same outputs, the same encoder, a loadable file."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomize

from sdxl.checkpoints.load import load_vae_file
from sdxl.interfaces.cli import main as cli_main
from sdxl.models import vae as vae_models
from sdxl.models.vae import AutoencoderKL
from sdxl.training import vae_fp16
from sdxl.training.vae_fp16 import FP16_MAX, FineTune, activation_report, output_difference

SIZE = 64  # pixels: 8x8 latents for vae.tiny (widths 32/64/64/64, 2 res blocks per decoder level)
BIG = 1e4  # what the overflowing activations are multiplied by (stream maxima ~40 -> ~4e5 > 65504)


def overflowing_vae(seed: int = 0) -> AutoencoderKL:
    """vae.tiny, randomized, then two function-preserving changes that push activations past 65504:
    - up.1.block.0.conv1 x BIG (norm2 follows: it removes the scale);
    - the residual stream from up.2's upsample conv through up.1's res blocks x BIG (the writers: the upsample conv
      and each conv2, weights and biases; the stream is read only by GroupNorms), compensated where the stream
      passes a linear map (up.1's upsample conv weight / BIG)."""
    vae = randomize(AutoencoderKL(vae_models.tiny), seed).eval().requires_grad_(False)
    d = vae.decoder
    with torch.no_grad():
        for conv in (d.up[1].block[0].conv1, d.up[2].upsample.conv, d.up[1].block[0].conv2, d.up[1].block[1].conv2):
            conv.weight.mul_(BIG)
            conv.bias.mul_(BIG)
        d.up[1].upsample.conv.weight.div_(BIG)
    return vae


def latents(vae: AutoencoderKL, n: int, seed: int) -> torch.Tensor:
    return vae_fp16.random_latents(vae, n, SIZE, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def case(one_thread):
    """(original, its untouched state, fixed copy, steps taken, held-out latents)."""
    vae = overflowing_vae()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    train = lambda: vae_fp16.random_latents(vae, 1, SIZE, gen)
    fixed, steps = vae_fp16.make_fp16_safe(vae, train, latents(vae, 4, 2), FineTune(steps=20))
    return vae, state, fixed, steps, latents(vae, 4, 3)


def test_the_construction_preserves_the_function_and_overflows_float16(one_thread):
    vae, plain = overflowing_vae(), randomize(AutoencoderKL(vae_models.tiny), 0).eval()
    z = latents(vae, 2, 0)
    with torch.no_grad():
        assert (vae.decode(z) - plain.decode(z)).abs().max() < 1e-4
        assert not torch.isfinite(copy.deepcopy(vae).half().decode(z.half())).all()


def test_report_before_and_after(case):
    vae, _, fixed, _, held = case
    blocks = ["post_quant_conv", "conv_in", "mid.block_1", "mid.attn_1", "mid.block_2", "up.3", "up.2", "up.1", "up.0",
              "norm_out", "conv_out"]
    before32, before16 = activation_report(vae, held, torch.float32), activation_report(vae, held, torch.float16)
    after32, after16 = activation_report(fixed, held, torch.float32), activation_report(fixed, held, torch.float16)
    assert list(before32) == list(after16) == blocks
    assert before32["up.2"] > FP16_MAX and before32["up.1"] > FP16_MAX  # measured ~4e5
    assert max(before32[b] for b in blocks if b not in ("up.2", "up.1")) < 100
    assert before16["up.1"] == math.inf and before16["conv_out"] == math.inf  # overflowed, then NaN downstream
    assert max(after32.values()) <= vae_fp16.TARGET and max(after16.values()) < FP16_MAX  # measured ~7.2e3
    for b in blocks:  # blocks that were fine are left as they were
        if before32[b] < 100:
            assert after32[b] == pytest.approx(before32[b], rel=1e-5)


def test_fixed_copy_decodes_in_float16_as_the_original_in_float32(case):
    vae, _, fixed, steps, held = case
    assert steps == 0  # rescaling alone was enough here: no fine-tuning step was needed
    half = output_difference(fixed, vae, held, torch.float16)
    assert half["nonfinite"] == 0.0
    # measured: max 4.7e-3, mean 5.6e-4 (the float16 rounding of any VAE: the unmodified one gives 4.5e-3 / 5.6e-4)
    assert half["mean_abs"] < 2e-3 and half["max_abs"] < 2e-2
    exact = output_difference(fixed, vae, held, torch.float32)
    assert exact["max_abs"] < 1e-5  # powers-of-two rescaling: measured 0
    assert output_difference(vae, vae, held, torch.float16)["nonfinite"] > 0.5  # the original's float16: NaN


def test_encoder_and_original_untouched(case):
    vae, state, fixed, _, _ = case
    for k, v in vae.state_dict().items():
        assert torch.equal(v, state[k]), k
    fixed_state = fixed.state_dict()
    for k, v in state.items():
        if not k.startswith("decoder."):  # encoder, quant_conv, post_quant_conv: bit-identical
            assert torch.equal(fixed_state[k], v), k
    assert not fixed.decoder.conv_in.weight.requires_grad
    assert fixed.config.force_upcast is False and vae.config.force_upcast is True


def test_saved_file_loads_and_decodes_the_same(case, tmp_path):
    _, _, fixed, _, held = case
    path = tmp_path / "fixed.safetensors"
    vae_fp16.save_vae(fixed, path)
    loaded = load_vae_file(path)
    assert loaded.config == fixed.config
    assert set(loaded.state_dict()) == set(fixed.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.decode(held), fixed.decode(held))
        half, ref = load_vae_file(path, dtype=torch.float16), copy.deepcopy(fixed).half()
        assert torch.equal(half.decode(held.half()), ref.decode(held.half()))


def test_rescaling_is_exact_and_reaches_its_target(one_thread):
    vae = randomize(AutoencoderKL(vae_models.tiny), 5).eval().requires_grad_(False)
    z = latents(vae, 2, 6)
    scaled = copy.deepcopy(vae)
    scales = vae_fp16.rescale_decoder(scaled, z, target=8.0)  # maxima ~40: every segment scaled down
    assert set(scales.values()) <= {2.0**-k for k in range(1, 5)} and len(set(scales.values())) > 1
    with torch.no_grad():
        assert (scaled.decode(z) - vae.decode(z)).abs().max() < 1e-4  # GroupNorm's eps: not bit-exact
    maxima = vae_fp16.module_maxima(scaled, z)
    for name, _ in vae_fp16.stream_units(scaled):
        assert maxima[name] <= 8.0, name
    assert all(v <= 8.0 for k, v in maxima.items() if k.endswith(".conv1"))


def test_fine_tuning_lowers_the_activations_and_keeps_the_output(case):
    """What rescaling cannot reach, with a target below what it left (7.2e3): the penalty lowers the maxima until
    float16 decoding is under 2 x target, while the output stays near the original's."""
    vae, _, fixed, _, _ = case
    tuned, one = copy.deepcopy(fixed), latents(vae, 1, 7)
    before = max(activation_report(tuned, one).values())
    assert not vae_fp16.fits_half(tuned, one, 2048.0)
    steps = vae_fp16.fine_tune(tuned, vae, lambda: one, one, FineTune(steps=60, lr=1e-3, target=2048.0))
    assert 0 < steps < 60  # measured 30
    assert vae_fp16.fits_half(tuned, one, 2048.0)
    assert max(activation_report(tuned, one).values()) < 0.75 * before  # measured 5.8e3 -> 4.0e3
    assert output_difference(tuned, vae, one, torch.float32)["mean_abs"] < 0.05  # measured 0.018


# ---------------------------------------------------------------------------------------------
# The command.


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("vae") / "overflowing.safetensors"
    vae_fp16.save_vae(overflowing_vae(), path)
    return path


def test_cli_fixes_and_writes(vae_file, tmp_path, capsys):
    out = tmp_path / "fixed.safetensors"
    assert cli_main(["fix-vae-fp16", "--vae", str(vae_file), "--out", str(out), "--size", str(SIZE),
                     "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "inf (overflow)" in text and "float16: 0 of 11 blocks overflow" in text
    assert "fixed float16 vs original float32" in text and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.safetensors"]  # no temporary left
    with torch.no_grad():
        z = latents(vae_models.AutoencoderKL(vae_models.tiny), 1, 8).half()
        assert torch.isfinite(load_vae_file(out, dtype=torch.float16).decode(z)).all()


def test_cli_trains_on_images(vae_file, tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    g = torch.Generator().manual_seed(9)
    for i in range(3):  # not square: centre-cropped, then resized to --size
        pixels = torch.randint(0, 256, (48 + 16 * i, 64, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i}.png")
    out = tmp_path / "fixed.safetensors"
    assert cli_main(["fix-vae-fp16", "--vae", str(vae_file), "--out", str(out), "--data", str(data),
                     "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert "on 1 held-out latents" in text and "float16: 0 of 11 blocks overflow" in text and out.is_file()


def test_cli_report_only(vae_file, capsys):
    assert cli_main(["fix-vae-fp16", "--vae", str(vae_file), "--report-only", "--size", str(SIZE)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["block", "float32", "float16"]
    assert "float16: 5 of 11 blocks overflow (up.2, up.1, up.0, norm_out, conv_out)" in text


def _bad(tmp_path, vae_file):
    not_vae, text = tmp_path / "unet.safetensors", tmp_path / "text.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3)}, str(not_vae))
    text.write_text("hello")
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"mine")
    return [
        (["--vae", str(tmp_path / "missing.safetensors"), "--report-only"], "no such file"),
        (["--vae", str(not_vae), "--report-only"], "not an SDXL checkpoint"),
        (["--vae", str(text), "--report-only"], "not a safetensors file"),
        (["--vae", str(vae_file), "--out", str(exists)], "already exists"),
        (["--vae", str(vae_file), "--out", str(tmp_path / "x.ckpt")], "a .safetensors file"),
        (["--vae", str(vae_file), "--out", str(tmp_path / "no" / "x.safetensors")], "does not exist"),
        (["--vae", str(vae_file)], "--out FILE.safetensors is required"),
        (["--vae", str(vae_file), "--out", str(tmp_path / "y.safetensors"), "--data", str(tmp_path / "none")],
         "not a folder of images"),
        (["--vae", str(vae_file), "--report-only", "--steps", "many"], "invalid int value"),
        (["--vae", str(vae_file), "--report-only", "--size", "100"], "multiple of 8"),
        (["--vae", str(vae_file), "--report-only", "--device", "cuda:7" if not torch.cuda.is_available() else "x"],
         "--device"),
    ]


def test_cli_bad_input_one_line_nothing_written(vae_file, tmp_path, capsys):
    for args, words in _bad(tmp_path, vae_file):
        assert cli_main(["fix-vae-fp16", *args]) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sdxl fix-vae-fp16: error: ") and words in lines[0], (args, lines)
        assert "Traceback" not in captured.err and captured.out == ""
    assert (tmp_path / "exists.safetensors").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.safetensors", "text.safetensors", "unet.safetensors"]
