"""The trainer on tiny models, CPU only: the loss falls, checkpoints load and generate, LoRA files
round-trip in both formats, resume equals an uninterrupted run, 2-process DDP stays in sync, config errors."""

from __future__ import annotations

import copy
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.models import specs, unet as unet_models
from sdxl.models.unet import UNet
from sdxl.training import lora
from sdxl.training.config import TrainConfig, config_from_dict, load_config
from sdxl.training.train import train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four copies of one smooth 32x32 image with the same caption: an easy target."""
    folder = tmp_path_factory.mktemp("data")
    y, x = np.mgrid[0:32, 0:32] / 31.0
    pixels = np.stack([x, y, 1 - x * y], -1) * 255
    for i in range(4):
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a colourful gradient")
    return folder


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(init="tiny", data=str(data), resolution=32, bucket_multiple=8, batch_size=2, steps=4, lr=1e-3,
                warmup=0, output_dir=str(out), log_every=1, save_dtype="fp32")
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_checkpoint_generates(data, tmp_path):
    cfg = config(data, tmp_path / "run", steps=40, lr=2e-3, warmup=5, seed=1)
    result = train(cfg, progress=False)
    first, last = np.mean(result.losses[:8]), np.mean(result.losses[-8:])
    print(f"loss: first 8 steps {first:.4f}, last 8 steps {last:.4f}")
    assert last < 0.6 * first, (first, last)

    out = tmp_path / "run"
    assert (out / "loss.png").is_file() and (out / "latest.txt").read_text().strip() == "step_0000040"
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and len(rows) == 41

    import sdxl

    pipe = sdxl.load(result.checkpoint / "model.safetensors")
    trained = result.components.unet.state_dict()
    for k, v in pipe.base.unet.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = pipe.generate("a colourful gradient", width=32, height=32, steps=2, cfg=1.0, seed=0)
    assert images[0].size == (32, 32)


def test_cached_latents_match_encoding_on_the_fly(data, tmp_path):
    # The cache keeps each view's posterior (mean, std) in float16 and draws the same noise as encode(sample=True).
    plain = train(config(data, tmp_path / "plain", steps=3, random_crop=True), progress=False)
    cached = train(config(data, tmp_path / "cached", steps=3, random_crop=True, cache_latents=True), progress=False)
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=2e-2)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "cached" / "cache" / "latents_rank0.safetensors"))
    means = [v for k, v in saved.items() if k.endswith(".mean")]
    assert 1 <= len(means) <= 4 * 2 * 3 and means[0].shape == (4, 4, 4) and means[0].dtype == torch.float16
    from sdxl.training.train import LatentCache

    reloaded = LatentCache(tmp_path / "cached" / "cache" / "latents_rank0.safetensors")  # as a resumed run does
    assert len(reloaded.items) == len(means)
    more = train(config(data, tmp_path / "cached", steps=4, random_crop=True, cache_latents=True, resume="latest"),
                 progress=False)
    assert len(more.losses) == 1


def _outputs(unet: UNet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, c.context_dim, generator=g)
    y = torch.randn(2, c.adm_in_channels, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10.0, 500.0]), context, y)


def test_lora_files_load_back_in_both_formats(tmp_path):
    torch.manual_seed(0)
    base = UNet(unet_models.tiny).eval()
    trained = copy.deepcopy(base)
    names = lora.add_lora(trained, rank=4, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"))
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q" in names
    assert all(not p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(_outputs(trained), _outputs(base))  # up = 0: starts as the base model
    with torch.no_grad():
        for p in lora.lora_parameters(trained):
            p.normal_(std=0.3)
    expected = _outputs(trained)
    assert not torch.allclose(expected, _outputs(base), atol=1e-3)

    lora.save_lora_kohya(trained, tmp_path / "k.safetensors", dtype=torch.float32)
    lora.save_lora_peft(trained, tmp_path / "p.safetensors", dtype=torch.float32)
    from safetensors.torch import load_file

    kohya, peft = load_file(str(tmp_path / "k.safetensors")), load_file(str(tmp_path / "p.safetensors"))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert float(kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"]) == 2.0
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in peft
    assert "unet.up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2.lora_B.weight" in peft
    assert len(kohya) == 3 * len(names) and len(peft) == 2 * len(names)

    for path in ("k.safetensors", "p.safetensors"):
        merged = copy.deepcopy(base)
        assert len(lora.load_lora(merged, tmp_path / path)) == len(names)
        torch.testing.assert_close(_outputs(merged), expected, atol=1e-4, rtol=1e-4)
    half = copy.deepcopy(base)
    lora.load_lora(half, tmp_path / "k.safetensors", scale=0.0)
    assert torch.equal(_outputs(half), _outputs(base))

    merged = copy.deepcopy(trained)
    lora.remove_lora(merged, merge=True)
    assert not lora.lora_layers(merged) and set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_outputs(merged), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not a U-Net LoRA file"):
        lora.load_lora(base, ROOT / "no-such.safetensors") if False else lora.load_lora(
            base, _write(tmp_path / "x.safetensors", {"foo": torch.zeros(1)}))


def _write(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def _state(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.components.unet.state_dict().items()}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_equals_uninterrupted(data, tmp_path, kind):
    extra = dict(grad_accum=2, ema_decay=0.9, min_snr_gamma=5.0, offset_noise=0.05, caption_dropout=0.3,
                 random_crop=True, warmup=3, steps=4, save_every=2)
    if kind == "full":
        extra.update(mixed_precision="bf16", gradient_checkpointing=True)
    else:  # the refiner: bigG-only context, aesthetic score in y, low-noise timesteps
        extra.update(init="tiny_refiner", lora_rank=4, lora_alpha=4.0, objective="v_prediction", timestep_max=199,
                     cache_text=True)
    straight = train(config(data, tmp_path / "a", **extra), progress=False)
    train(config(data, tmp_path / "b", **{**extra, "steps": 2}), progress=False)
    resumed = train(config(data, tmp_path / "b", **extra, resume="latest"), progress=False)
    assert resumed.losses == straight.losses[2:]
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    ea = load_file(str(straight.checkpoint / "state.safetensors"))
    eb = load_file(str(resumed.checkpoint / "state.safetensors"))
    assert set(ea) == set(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert any(k.startswith("ema.") for k in ea)
    if kind == "lora":
        assert (straight.checkpoint / "lora_kohya_ema.safetensors").is_file()
        assert (straight.checkpoint / "lora_peft.safetensors").is_file()
        from sdxl.checkpoints.files import read_safetensors_header

        meta = read_safetensors_header(straight.checkpoint / "lora_kohya.safetensors")["__metadata__"]
        assert meta["ss_output_name"] == "a" and meta["ss_base_model_version"] == "sdxl_base_v1-0"  # kohya's keys
        # Only the adapters trained: the base weights are the random init of the seed.
        fresh = train(config(data, tmp_path / "c", **{**extra, "steps": 1, "save_every": 0}), progress=False)
        f = _state(fresh)
        assert all(torch.equal(a[k], f[k]) for k in a if "lora_" not in k)
    else:
        assert (straight.checkpoint / "model_ema.safetensors").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    result = train(cfg, progress=False)
    save_file({k: v.contiguous() for k, v in result.components.unet.state_dict().items()}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_ddp_two_processes_stay_in_sync(data, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    cfg = config(data, tmp_path / "run", batch_size=1, steps=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    init = specs.build_components(specs.TINY, cfg.seed).unet.state_dict()  # what init = "tiny" starts from
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert not all(torch.equal(r0[k], init[k]) for k in r0)  # it did train
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "rng_rank1.safetensors").is_file()


def _train_worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    train(cfg, progress=False)
    dist.destroy_process_group()


@pytest.mark.slow  # ~60 s: torchrun clusters of 2
def test_fsdp_matches_ddp_and_resumes_exactly(data, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    def run(out: str, **kw) -> None:
        cfg = config(data, tmp_path / out, **{**dict(batch_size=1, steps=4, grad_accum=2, ema_decay=0.9,
                                                     train_text_encoders=True, save_every=2), **kw})
        mp.spawn(_train_worker, args=(2, _free_port(), cfg), nprocs=2, join=True)

    def final(out: str, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / out / "checkpoints" / "step_0000004" / f"{name}.safetensors"))

    run("ddp", parallel="ddp")
    run("fsdp", parallel="fsdp")
    run("resumed", parallel="fsdp", steps=2)
    run("resumed", parallel="fsdp", resume="latest")
    # The same training: gradients reduce-scattered instead of all-reduced (float sums in another order).
    for name in ("model", "model_ema"):
        a, b = final("ddp", name), final("fsdp", name)
        assert set(a) == set(b)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    # Each process holds a part of every trained tensor and of its optimizer state.
    whole, s0, s1 = final("ddp", "state"), final("fsdp", "state_rank0"), final("fsdp", "state_rank1")
    assert set(s0) == set(s1) == set(whole)
    assert all(s0[k].numel() + s1[k].numel() == whole[k].numel() for k in whole if whole[k].dim() > 0)
    assert any(s0[k].numel() < whole[k].numel() for k in whole)
    # Resumed from its sharded state, the run ends exactly where the uninterrupted one does.
    for name in ("model", "model_ema", "state_rank0", "state_rank1"):
        a, b = final("fsdp", name), final("resumed", name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_config_errors_are_clear(tmp_path):
    def err(text: str) -> str:
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            load_config(path)
        return str(e.value)

    ok = 'init = "tiny"\ndata = "d"\n'
    assert load_config(_text(tmp_path / "ok.toml", ok)).init == "tiny"
    assert "unknown key(s) lora_rnak (did you mean lora_rank?)" in err(ok + "lora_rnak = 4\n")
    assert "objective must be one of 'epsilon', 'v_prediction'" in err(ok + 'objective = "eps"\n')
    assert "exactly one of `model`" in err('data = "d"\n')
    assert "timestep_min <= timestep_max" in err(ok + "timestep_min = 500\ntimestep_max = 100\n")
    assert "batch_size must be a int" in err(ok + 'batch_size = "2"\n')
    assert "mixed_precision must be one of" in err(ok + 'mixed_precision = "fp8"\n')
    assert "not valid TOML" in err(ok + "steps = \n")
    assert "unexpected table" in err(ok + "[lora]\nrank = 4\n")
    assert "lora_targets" in err(ok + 'lora_rank = 4\nlora_targets = ["to_z"]\n')
    assert "fsdp\" is for full fine-tunes" in err(ok + 'lora_rank = 4\nparallel = "fsdp"\n')
    assert "parallel must be one of 'ddp', 'fsdp'" in err(ok + 'parallel = "zero3"\n')
    assert str(tmp_path / "c.toml") in err(ok + "lr = -1.0\n")
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"init": "tiny", "data": "d", "foo": 1})
    # YAML reads the same fields.
    yaml_cfg = load_config(_text(tmp_path / "c.yaml", "init: tiny\ndata: d\nlr: 2.0e-4\nlora_targets: [to_q, to_k]\n"))
    toml_cfg = load_config(_text(tmp_path / "c2.toml", ok + 'lr = 2e-4\nlora_targets = ["to_q", "to_k"]\n'))
    assert yaml_cfg == toml_cfg
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(_text(tmp_path / "bad.yml", "init: [tiny\n"))
    with pytest.raises(ValueError, match="unknown key"):
        load_config(_text(tmp_path / "typo.yml", "init: tiny\ndata: d\nlerning_rate: 1\n"))
    for example in sorted((ROOT / "configs").glob("*.toml")):
        if not example.name.startswith("vae_"):  # the VAE trainer's (tests/test_training_vae.py reads those)
            load_config(example)  # the shipped examples parse


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
