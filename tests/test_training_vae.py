"""sdxl.training.train_vae: a few steps lower the loss; the saved VAE (and init checkpoint) reload identically."""

from __future__ import annotations

import torch

from sdxl.models import vae as vae_models
from sdxl.training import train_vae as tv
from sdxl.training.shapes import write_dataset

SMALL = vae_models.VAEConfig(base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)


def test_train_save_reload(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 24, resolution=64, seed=0)
    groups = tv.load_images(data)
    x = tv.SizeBatches(groups, 8, seed=5, crop=32).next()
    assert x.shape == (8, 3, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0

    torch.manual_seed(0)
    before = tv.AutoencoderKL(SMALL).eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        loss_before, l1_before, _ = tv.vae_loss(before, x, gen(), 1e-4)
        with_edges = tv.vae_loss(before, x, gen(), 1e-4, edge_weight=1.0)[0]
    assert float(with_edges) > float(loss_before)  # the edge term adds the neighbour-difference error

    vae, losses = tv.train_vae(tmp_path / "out", data, steps=30, batch_size=8, lr=3e-3, warmup=5, seed=0,
                               config=SMALL, crop=32, progress=False)
    assert len(losses) == 30 and all(map(torch.isfinite, map(torch.tensor, losses)))
    with torch.no_grad():
        _, l1_after, _ = tv.vae_loss(vae, x, gen(), 1e-4)
    assert float(l1_after) < 0.8 * float(l1_before)
    assert vae.config.scaling_factor != SMALL.scaling_factor and vae.config.scaling_factor > 0

    # The generic VAE-file loader (pipeline `vae=`, `sdxl convert --vae`) reads its size from the metadata.
    from sdxl.checkpoints.load import load_vae_file

    loaded = load_vae_file(tmp_path / "out" / "vae.safetensors")
    assert loaded.config == vae.config
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), vae.decode(vae.encode(x)))

    assert load_vae_file(tmp_path / "out" / "vae.safetensors").config == vae.config

    # The init checkpoint holds the same VAE (and its scaling factor) for `model = ...` in a training config.
    from sdxl.checkpoints.load import load

    parts = load(tmp_path / "out" / "init_base.safetensors", dtype=torch.float32)
    assert parts.kind == "base" and parts.vae.config == vae.config and parts.text_encoder is not None
    assert all(torch.equal(a, b) for a, b in zip(parts.vae.state_dict().values(), vae.state_dict().values()))
    refiner = load(tmp_path / "out" / "init_refiner.safetensors", dtype=torch.float32)
    assert refiner.kind == "refiner" and refiner.text_encoder is None

    # A decoder-only second stage keeps the encoder (the latents) and the scaling factor.
    vae2, _ = tv.train_vae(tmp_path / "out2", data, steps=3, batch_size=4, seed=1, crop=32, progress=False,
                           init_from=tmp_path / "out" / "vae.safetensors", decoder_only=True, init_checkpoints=False,
                           edge_weight=1.0)
    assert vae2.config == vae.config
    assert all(torch.equal(a, b) for a, b in zip(vae2.encoder.state_dict().values(), vae.encoder.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(vae2.decoder.state_dict().values(), vae.decoder.state_dict().values()))

    # keep_scaling: the whole VAE trains on, and its scaling factor stays (a U-Net fine-tunes onto the new latents).
    vae3, _ = tv.train_vae(tmp_path / "out3", data, steps=3, batch_size=4, seed=2, crop=32, progress=False,
                           init_from=tmp_path / "out" / "vae.safetensors", keep_scaling=True, init_checkpoints=False)
    assert vae3.config == vae.config
    assert not all(torch.equal(a, b) for a, b in zip(vae3.encoder.state_dict().values(), vae.encoder.state_dict().values()))
