"""LoRAs, embeddings and prompt syntax in the pipeline: whole images against diffusers' `load_lora_weights` and
`load_textual_inversion` on the small random models of tests/test_pipeline.py (max 2/255), LoRAs by name from
folders (`<lora:NAME:W>` and `loras=`), base weights restored bit for bit when the set changes, and prompt
editing switching the conditioning at AUTOMATIC1111's call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdxl
from sdxl.adapters.keys import KOHYA, PEFT
from sdxl.conditioning import Conditioning
from sdxl.pipeline import guided_unet
from test_adapters import kohya_file, lora_tensors, peft_file
from test_pipeline import PROMPT, assert_close_images, models, reference  # noqa: F401 (models: a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::sdxl.options.ResolutionWarning")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

SETTINGS = dict(width=64, height=64, steps=4, cfg=5.0, seed=3)


def theirs(pipe, prompt=PROMPT, **extra) -> np.ndarray:
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return reference(pipe, prompt=prompt, width=64, height=64, num_inference_steps=4, guidance_scale=5.0, seed=3,
                     output_type="np", **extra)


@pytest.fixture(scope="module")
def lora_dir(models, tmp_path_factory):  # noqa: F811
    """A folder with a kohya LoRA (LoCon convolutions, both text encoders) for the base."""
    folder = tmp_path_factory.mktemp("loras")
    parts = sdxl.load(models["base"][1]).base
    kohya_file(folder / "style.safetensors", lora_tensors(parts, {KOHYA}, seed=5, scale=0.15))
    return folder


@pytest.fixture(scope="module")
def pipe(models, lora_dir):  # noqa: F811
    return sdxl.load(models["base"][1], lora_dirs=[lora_dir])


def test_a_kohya_lora_by_tag_gives_diffusers_image_and_restores_exactly(models, pipe, lora_dir):  # noqa: F811
    before = pipe.generate(PROMPT, output="np", **SETTINGS)
    with_lora = pipe.generate(PROMPT + " <lora:style:0.7>", output="np", **SETTINGS)
    d = models["base"][0]
    d.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="style")
    try:
        d.set_adapters(["style"], adapter_weights=[0.7])
        want = theirs(d)
    finally:
        d.unload_lora_weights()
    assert_close_images(with_lora, want, "kohya LoRA at 0.7")
    assert np.abs(with_lora - before).max() > 5 / 255  # the LoRA changed the image
    assert [(name, u, t) for name, _, u, t in pipe.last_loras] == [("style", 0.7, 0.7)]
    after = pipe.generate(PROMPT, output="np", **SETTINGS)
    assert np.array_equal(after, before)  # the base weights came back bit for bit
    fresh = sdxl.load(models["base"][1]).generate(PROMPT, output="np", **SETTINGS)
    assert np.array_equal(fresh, before)


def test_a_peft_lora_gives_diffusers_image(models, tmp_path):  # noqa: F811
    ours = sdxl.load(models["base"][1])
    path = peft_file(tmp_path / "peft.safetensors",
                     lora_tensors(ours.base, {PEFT}, seed=8, scale=0.15, linear_only=True), metadata=True)
    got = ours.generate(PROMPT, loras=[(str(path), 0.6)], output="np", **SETTINGS)
    d = models["base"][0]
    d.load_lora_weights(str(path), adapter_name="peft")
    try:
        d.set_adapters(["peft"], adapter_weights=[0.6])
        want = theirs(d)
    finally:
        d.unload_lora_weights()
    assert_close_images(got, want, "PEFT LoRA at 0.6")
    assert np.abs(got - ours.generate(PROMPT, output="np", **SETTINGS)).max() > 5 / 255


def test_loras_by_argument_and_separate_weights(pipe, lora_dir):
    by_tag = pipe.generate(PROMPT + " <lora:style:0.5:0.9>", output="np", **SETTINGS)
    by_name = pipe.generate(PROMPT, loras=[("style", 0.9, 0.5)], output="np", **SETTINGS)
    by_path = pipe.generate(PROMPT, loras=[(str(lora_dir / "style.safetensors"), 0.9, 0.5)], output="np", **SETTINGS)
    assert np.array_equal(by_tag, by_name) and np.array_equal(by_tag, by_path)
    unet_only = pipe.generate(PROMPT, loras=[("style", 0.9, 0.0)], output="np", **SETTINGS)
    assert not np.array_equal(unet_only, by_name)


def test_only_names_in_the_folders_resolve(pipe, lora_dir):
    with pytest.raises(ValueError, match="LoRA 'nothere': not found in"):
        pipe.generate(PROMPT + " <lora:nothere:1>", **SETTINGS)
    with pytest.raises(ValueError, match="a name from the LoRA folders, not a path"):
        pipe.generate(PROMPT + " <lora:../style:1>", **SETTINGS)
    pipe.allow_adapter_paths = False  # a server's setting: requests never name files by path
    try:
        with pytest.raises(ValueError, match="not a path"):
            pipe.generate(PROMPT, loras=[(str(lora_dir / "style.safetensors"), 1.0)], **SETTINGS)
    finally:
        pipe.allow_adapter_paths = True


def test_an_embedding_gives_diffusers_textual_inversion_image(models, tmp_path):  # noqa: F811
    g = torch.Generator().manual_seed(11)
    vectors = {"clip_l": torch.randn(2, 32, generator=g) * 3, "clip_g": torch.randn(2, 64, generator=g) * 3}
    save_file(vectors, str(tmp_path / "fancystyle.safetensors"))
    ours = sdxl.load(models["base"][1], embedding_dirs=[tmp_path])
    prompt = "a red fox in fancystyle, detailed photograph"
    got = ours.generate(prompt, output="np", **SETTINGS)
    d = models["base"][0]
    d.load_textual_inversion(vectors["clip_l"], token="fancystyle", text_encoder=d.text_encoder, tokenizer=d.tokenizer)
    d.load_textual_inversion(vectors["clip_g"], token="fancystyle", text_encoder=d.text_encoder_2,
                             tokenizer=d.tokenizer_2)
    try:
        want = theirs(d, prompt)
    finally:
        d.unload_textual_inversion("fancystyle", tokenizer=d.tokenizer, text_encoder=d.text_encoder)
        d.unload_textual_inversion("fancystyle", tokenizer=d.tokenizer_2, text_encoder=d.text_encoder_2)
    # ~1/255 apart: diffusers pools bigG at the highest token id (its CLIP config's legacy eos_token_id), which is
    # the embedding's added token, not the end token; ours pools at the end token, as open_clip and A1111 do
    assert_close_images(got, want, "textual inversion")
    plain = sdxl.load(models["base"][1]).generate(prompt, output="np", **SETTINGS)
    assert np.abs(got - plain).max() > 5 / 255


def test_prompt_editing_switches_at_a1111s_call():
    seen = []

    class Unet(torch.nn.Module):  # records which context each call got
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, context, y):
            seen.append(float(context[0, 0, 0]))
            return x * self.w

    def cond(value):
        return Conditioning(torch.full((2, 77, 4), value), torch.zeros(2, 8), True)

    model = guided_unet(Unet(), [(2, cond(1.0)), (4, cond(2.0))], 5.0, 0.0)
    for _ in range(6):
        model(torch.zeros(1, 4, 2, 2), torch.tensor(1.0))
    assert seen == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # calls 0..2 use "cat" in [cat:dog:2]; past the end: the last


def test_prompt_editing_changes_the_image_at_its_step(pipe):
    cat, dog = (pipe.generate(p, output="np", **SETTINGS) for p in ("a cat", "a dog"))
    edit = pipe.generate("a [cat:dog:2]", output="np", **SETTINGS)
    assert not np.array_equal(edit, cat) and not np.array_equal(edit, dog)
    never = pipe.generate("a [cat:dog:9]", output="np", **SETTINGS)  # past the last step: "cat" throughout
    assert np.array_equal(never, cat)
