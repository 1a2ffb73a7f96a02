"""Textual-inversion embeddings: SDXL's clip_l / clip_g files (safetensors and weights-only pickles), A1111's
string_to_param layout, and one-line refusals of embeddings for other models or of pickles that hold objects."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_components
from safetensors.torch import save_file

from sdxl.adapters import read_embedding
from sdxl.checkpoints.keymap import CheckpointError


def vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_sdxl_safetensors_and_pickles(tmp_path):
    l, g = vectors(3, 768), vectors(3, 1280, seed=1)
    save_file({"clip_l": l.half(), "clip_g": g.half()}, str(tmp_path / "style.safetensors"))
    emb = read_embedding(tmp_path / "style.safetensors")
    assert emb.name == "style" and emb.vectors == 3 and emb.clip_l.dtype == torch.float32
    assert torch.equal(emb.clip_l, l.half().float()) and torch.equal(emb.clip_g, g.half().float())
    torch.save({"clip_l": l, "clip_g": g}, tmp_path / "style2.pt")
    emb = read_embedding(tmp_path / "style2.pt")
    assert emb.name == "style2" and torch.equal(emb.clip_g, g)


def test_a1111_string_to_param(tmp_path):
    l, g = vectors(2, 768), vectors(2, 1280, seed=1)
    for name, param in (("pair", {"clip_l": l, "clip_g": g}), ("joined", torch.cat([l, g], dim=1))):
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": param}, "name": name, "step": 1500},
                   tmp_path / f"{name}.pt")
        emb = read_embedding(tmp_path / f"{name}.pt")
        assert emb.vectors == 2 and torch.equal(emb.clip_l, l) and torch.equal(emb.clip_g, g), name


def test_widths_are_checked_against_the_model(tmp_path):
    parts = tiny_components("base")  # text encoders 32 and 64 wide
    save_file({"clip_l": vectors(1, 32), "clip_g": vectors(1, 64)}, str(tmp_path / "tiny.safetensors"))
    assert read_embedding(tmp_path / "tiny.safetensors", parts).vectors == 1
    with pytest.raises(CheckpointError, match=r"clip_l vectors are 32 wide, this model's text encoder takes 768"):
        read_embedding(tmp_path / "tiny.safetensors")
    refiner = tiny_components("refiner")  # bigG only: clip_l is not checked
    assert read_embedding(tmp_path / "tiny.safetensors", refiner).vectors == 1


@pytest.mark.parametrize("case, data, message", [
    ("sd15", {"string_to_param": {"*": vectors(4, 768)}}, r"an SD 1\.x embedding \(768-wide"),
    ("sd2", {"<tok>": vectors(4, 1024)}, r"an SD 2\.x embedding"),
    ("counts", {"clip_l": vectors(2, 768), "clip_g": vectors(3, 1280)}, r"2 clip_l vectors but 3 clip_g vectors"),
    ("odd", {"a": vectors(1, 8), "b": vectors(1, 8)}, r"not an SDXL embedding: expected clip_l and clip_g"),
    ("many", {"string_to_param": {"*": vectors(1, 2048), "x": vectors(1, 2048)}}, r"exactly one embedding"),
])
def test_other_embeddings_are_refused_in_one_line(tmp_path, case, data, message):
    path = tmp_path / f"{case}.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=message) as e:
        read_embedding(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


class Payload:
    """Stands for any object a pickle could rebuild (and run code while doing so)."""


def test_pickles_with_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refused to load this pickle \(only weights-only pickles are read\)"):
        read_embedding(path)
