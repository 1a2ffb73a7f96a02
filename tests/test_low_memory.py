"""Low-memory generation on the CPU (`sdxl.load(low_memory=True)`, `sdxl generate --low-memory`): U-Net weights
quantised as they are read (the same bits as quantising after loading), int8 layers against the float layers they
replace, text encoders released and read again with identical conditioning, and the mode's images against the
plain path's (equal where the arithmetic is the same, within a stated tolerance where weights are quantised)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdxl
from sdxl.acceleration import FP8Linear, Int8Linear, QuantisedLinear, quantize_int8, store_quantised
from sdxl.checkpoints import resident
from sdxl.conditioning import PromptCache

pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")

KW = {"prompt": "a red circle on a blue background", "steps": 3, "width": 64, "height": 64, "seed": 1, "cfg": 3.0,
      "output": "np"}


@pytest.fixture(scope="module")
def plain():
    return sdxl.load("builtin")


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quantised_as_read_equals_quantised_after_loading(plain, kind):
    after = sdxl.load("builtin")
    assert store_quantised(after.base.unet, kind) > 100
    read = sdxl.load("builtin", quantise=kind)
    layers = [m for m in read.base.unet.modules() if isinstance(m, QuantisedLinear)]
    assert layers and all(type(m) is (FP8Linear if kind == "fp8" else Int8Linear) for m in layers)
    assert not any(type(m) is nn.Linear for m in read.base.unet.modules())
    a, b = after.base.unet.state_dict(), read.base.unet.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(after.generate(**KW), read.generate(**KW))


@pytest.mark.parametrize("rows", [3, 40])  # fewer rows than input features (the output is scaled), and more
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_linear_of_its_dequantised_weight(rows, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(32, 24).to(dtype)
    q = Int8Linear(linear)
    weight_int8, scale = quantize_int8(linear.weight.detach())
    assert torch.equal(q.weight_int8, weight_int8) and q.weight_int8.dtype == torch.int8
    assert int(q.weight_int8.abs().max()) == 127  # absmax: every row's largest weight at full scale
    x = torch.randn(rows, 32).to(dtype)
    expected = F.linear(x.float(), weight_int8.float() * scale.float(), linear.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(q(x).float(), expected, atol=tol, rtol=tol)
    # and close to the float layer: absmax int8 keeps each weight within half a step (plus, in bfloat16, the
    # scale's own rounding: at most 2^-9 of the largest weight)
    step = scale.float().max()
    slack = 1e-6 if dtype == torch.float32 else 127 * step * 2**-9
    error = (q.weight_int8.float() * scale.float() - linear.weight.detach().float()).abs().max()
    assert float(error) <= step / 2 + slack


def test_text_encoders_released_and_read_back_give_identical_conditioning():
    pipe = sdxl.load("builtin", dtype="bf16")
    parts = pipe.base
    cache = PromptCache()
    before = cache.encode(parts, "a red circle", "a red circle", hidden_layer=-2)
    weights = {k: v.clone() for k, v in parts.text_encoder_2.state_dict().items()}
    assert resident.release(parts.text_encoder_2, parts.origins["text_encoder_2"])
    assert resident.is_released(parts.text_encoder_2)
    assert all(t.is_meta for t in parts.text_encoder_2.state_dict().values())  # the memory is given back
    resident.restore(parts.text_encoder_2, parts.origins["text_encoder_2"])
    after_weights = parts.text_encoder_2.state_dict()
    assert all(torch.equal(weights[k], after_weights[k]) and weights[k].dtype == after_weights[k].dtype
               for k in weights)
    cache.clear()
    after = cache.encode(parts, "a red circle", "a red circle", hidden_layer=-2)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_a_model_not_read_from_a_file_is_never_released(plain):
    model = nn.Linear(2, 2)
    assert not resident.release(model, None) and not resident.is_released(model)


def test_low_memory_images_equal_the_same_arithmetic_and_stay_close_to_float32(plain):
    lm = sdxl.load("builtin", low_memory=True, dtype="fp32")
    assert lm.release_text_encoders
    first = lm.generate(**KW)
    assert resident.is_released(lm.base.text_encoder) and resident.is_released(lm.base.text_encoder_2)
    # the same arithmetic without releasing anything: int8 U-Net, encoders kept
    same = sdxl.load("builtin", quantise="int8", dtype="fp32")
    assert np.array_equal(first, same.generate(**KW))
    second = lm.generate(**{**KW, "prompt": "a blue square"})  # a new prompt: the encoders are read again
    assert np.array_equal(second, same.generate(**{**KW, "prompt": "a blue square"}))
    again = lm.generate(**{**KW, "prompt": "a blue square"})  # a cached prompt: nothing is read
    assert np.array_equal(again, second) and resident.is_released(lm.base.text_encoder_2)
    # int8 weights against the float32 model (measured on this model: max 0.044, mean 0.0035 on a 0..1 scale)
    reference = plain.generate(**KW)
    assert float(np.abs(first - reference).mean()) < 0.01 and float(np.abs(first - reference).max()) < 0.15


def test_low_memory_picks_bf16_only_where_the_cpu_is_fast_at_it(monkeypatch):
    from sdxl import pipeline

    monkeypatch.setattr(pipeline, "cpu_bf16_speedup", lambda: 1.1)
    assert pipeline.auto_dtype("cpu") == torch.float32
    monkeypatch.setattr(pipeline, "cpu_bf16_speedup", lambda: 4.0)
    assert pipeline.auto_dtype("cpu") == torch.bfloat16 and pipeline.auto_dtype("cuda") == torch.float16
    assert pipeline.low_memory_format("cpu") == "int8" and pipeline.low_memory_format("cuda") == "fp8"
    with pytest.raises(ValueError, match="quantise must be one of fp8, int8"):
        sdxl.load("builtin", quantise="int4")


def test_generate_low_memory_from_the_command_line_and_back_from_its_png(tmp_path):
    from PIL import Image

    from sdxl.interfaces.cli import main

    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", "builtin", "--low-memory", "--dtype", "fp32",
                 "--steps", "2", "--width", "64", "--height", "64", "--out", str(out)]) == 0
    stored = json.loads(Image.open(out).text["sdxl"])
    assert stored["low_memory"] is True and stored["dtype"] == "fp32"
    again = tmp_path / "b.png"
    assert main(["generate", "--from-image", str(out), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert json.loads(Image.open(again).text["sdxl"])["low_memory"] is True


def test_low_memory_never_uses_the_files_pages_in_place():
    """Mapped pages stay resident (and in the RSS) while the file is mapped, also those of tensors quantised or
    released since (a full-size SDXL quantised from a mapped float16 file peaked at 7.64 GiB, 4.31 of them file
    pages): quantised models and low-memory loads read copies, other loads in the stored dtype still map."""
    from sdxl import builtin
    from sdxl.checkpoints.files import open_tensors
    from sdxl.checkpoints.load import Prefixed, _choose_reads

    tensors = open_tensors(builtin.path("builtin"))
    unet = Prefixed(tensors, "model.diffusion_model.")
    _choose_reads(unet, torch.float16, torch.device("cpu"))
    assert tensors.read_to is None  # stored float16, wanted float16: the file's pages as they are
    _choose_reads(unet, torch.float16, torch.device("cpu"), mapped=False)
    assert tensors.read_to == torch.device("cpu")
    pipe = sdxl.load("builtin", low_memory=True, dtype="fp16")
    assert pipe.dtype == torch.float16 and np.isfinite(pipe.generate(**{**KW, "steps": 1})).all()
