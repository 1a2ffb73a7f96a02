"""sdxl.training.train_vae: the built-in recipe (a few steps lower the loss; the saved VAE and init checkpoints reload
identically) and the LDM-recipe trainer of `sdxl train-vae CONFIG` (EMA, accumulation, resume, decoder-only, GAN,
the command line and its one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl.models import vae as vae_models
from sdxl.training import discriminator as disc_lib
from sdxl.training import train_vae as tv
from sdxl.training.shapes import write_dataset
from sdxl.training.vae_config import VAETrainConfig, load_vae_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on shared cores (tests/conftest.py)

SMALL = vae_models.VAEConfig(base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)


def test_train_save_reload(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 24, resolution=64, seed=0)
    groups = tv.load_images(data)
    x = tv.SizeBatches(groups, 8, seed=5, crop=32).next()
    assert x.shape == (8, 3, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0

    torch.manual_seed(0)
    before = tv.AutoencoderKL(SMALL).eval()
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(0)

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


# ---------------------------------------------------------------------------------------------
# The LDM-recipe trainer (`sdxl train-vae CONFIG`).



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """24 shape images (several aspect ratios) and a SMALL VAE file to fine-tune (official names)."""
    root = tmp_path_factory.mktemp("vae_data")
    write_dataset(root / "data", 24, resolution=32, seed=0)
    torch.manual_seed(0)
    tv.save_vae(tv.AutoencoderKL(SMALL), root / "small_vae.safetensors")
    return root


def _cfg(shapes, out, **kw) -> VAETrainConfig:
    base = {"model": str(shapes / "small_vae.safetensors"), "data": str(shapes / "data"), "resolution": 32,
            "bucket_multiple": 8, "batch_size": 2, "steps": 2, "lr": 1e-3, "perceptual_weight": 0.0,
            "output_dir": str(out), "ema_decay": 0.9, "ema_warmup": False, "log_every": 1}
    return VAETrainConfig(**{**base, **kw})


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_ema_is_the_closed_form_recurrence():
    p = torch.zeros(3)
    ema = tv.EMA({"w": p}, decay=0.8)
    values = [torch.full((3,), float(v)) for v in (1.0, -2.0, 4.0, 0.5)]
    for v in values:
        ema.update({"w": v})
    # e_n = d^n e_0 + sum_k (1 - d) d^(n-k) p_k, e_0 = 0
    expected = sum((1 - 0.8) * 0.8 ** (len(values) - k) * v for k, v in enumerate(values, 1))
    torch.testing.assert_close(ema.shadow["w"], expected, rtol=1e-6, atol=1e-7)
    # LitEma's warm-up: d_n = min(decay, (1 + n) / (10 + n))
    warm, e = tv.EMA({"w": p}, decay=0.9999, warmup=True), torch.zeros(3)
    for n, v in enumerate(values, 1):
        warm.update({"w": v})
        d = min(0.9999, (1 + n) / (10 + n))
        e = d * e + (1 - d) * v
        assert warm.current_decay() == d
    torch.testing.assert_close(warm.shadow["w"], e, rtol=1e-6, atol=1e-7)
    # applied(): the shadows for the block, the trained weights after
    w = torch.nn.Parameter(torch.ones(3))
    ema = tv.EMA({"w": w}, decay=0.5)
    ema.shadow["w"].fill_(7.0)
    with ema.applied({"w": w}):
        assert torch.equal(w.detach(), torch.full((3,), 7.0))
    assert torch.equal(w.detach(), torch.ones(3))


class _Images:
    """Fixed micro-batches in place of the data set's (the trainer calls next() once per micro-batch)."""

    def __init__(self, batches):
        self.batches, self.epoch, self.index = list(batches), 0, 0

    def __next__(self):
        self.index += 1
        return {"images": self.batches[self.index - 1]}


def test_accumulation_equals_the_big_batch(shapes, tmp_path):
    """2 micro-batches of 2 = one batch of 4 (the loss is a mean over the batch): the same weights after a step,
    to float32 rounding. (The posterior noise of 2 + 2 images is the noise of 4: a CPU generator draws
    randn in blocks of 16 values, and each image's latent holds 64.)"""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    after = []
    for accum, batches in ((2, [x[:2], x[2:]]), (1, [x])):
        cfg = _cfg(shapes, tmp_path / f"accum{accum}", grad_accum=accum, batch_size=4 // accum, kl_weight=1.0,
                   ema_decay=None)
        run = tv._start(cfg, tv.Dist())
        run.batches = _Images(batches)
        values = tv._train_step(run)
        after.append((values, {k: p.grad.clone() for k, p in run.params.items()}))
    (va, ga), (vb, gb) = after
    assert va["loss"] == pytest.approx(vb["loss"], rel=1e-6)
    assert ga.keys() == gb.keys() and all(g.abs().max() > 0 for g in ga.values())
    # The gradients the optimizer steps on (Adam's first step would magnify rounding: it moves by ~lr sign(g)).
    # Measured: within ~1e-7 of the largest gradient; biases ahead of a GroupNorm have gradients of rounding size.
    scale = max(float(g.abs().max()) for g in gb.values())
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("gan, cosine", [(False, 0.99), (True, 0.93)])
def test_bf16_mixed_precision_computes_in_bf16_and_keeps_float32_weights(shapes, tmp_path, gan, cosine):
    """mixed_precision = "bf16": the convolutions run in bfloat16 (the VAE's and the discriminator's), weights and
    gradients stay float32, and the step's loss and gradients stay near float32's. Measured on this tiny random VAE:
    loss within 0.02% (0.2% with the GAN), gradient cosine 0.995 (0.960 with the GAN: the adaptive weight scales
    the discriminator's gradient, which bfloat16 moves most, up to the reconstruction's)."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    seen, results = {}, {}
    for precision in ("no", "bf16"):
        extra = {"discriminator": True, "disc_start": 0, "disc_channels": 8, "disc_layers": 2} if gan else {}
        run = tv._start(_cfg(shapes, tmp_path / precision, mixed_precision=precision, **extra), tv.Dist())
        run.batches = _Images([x])
        modules = [(precision, run.vae.decoder.conv_out)] + [(precision + " disc", run.disc)] * gan
        for name, module in modules:
            module.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o.dtype) and None)
        values = tv._train_step(run)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in run.params.values())
        results[precision] = values, torch.cat([p.grad.flatten() for p in run.params.values()])
    assert seen == {"no": torch.float32, "bf16": torch.bfloat16,
                    **({"no disc": torch.float32, "bf16 disc": torch.bfloat16} if gan else {})}
    (v32, g32), (v16, g16) = results["no"], results["bf16"]
    assert all(map(torch.isfinite, map(torch.tensor, v16.values())))
    assert v16["loss"] == pytest.approx(v32["loss"], rel=5e-3) and v16["disc"] == pytest.approx(v32["disc"], rel=5e-2)
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > cosine


def test_resume_equals_the_uninterrupted_run_and_decoder_only_keeps_the_encoder(shapes, tmp_path):
    """4 steps in one go = 2 steps, then --resume latest to 4: the same VAE, EMA, optimizers, discriminator, bit
    for bit. decoder_only: the encoder and quant_conv are the input file's, bit for bit."""
    kw = {"decoder_only": True, "discriminator": True, "disc_start": 3, "disc_channels": 8, "disc_layers": 2,
          "steps": 4}
    whole = tv.train(_cfg(shapes, tmp_path / "whole", save_every=2, **kw), progress=False)
    tv.train(_cfg(shapes, tmp_path / "part", **{**kw, "steps": 2}), progress=False)
    resumed = tv.train(_cfg(shapes, tmp_path / "part", **{**kw, "resume": "latest"}), progress=False)
    assert whole.step == resumed.step == 4 and len(resumed.losses) == 2
    a, b = _tensors(tmp_path / "whole" / "vae.safetensors"), _tensors(tmp_path / "part" / "vae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = _tensors(tmp_path / "whole/checkpoints/step_0000004/state.safetensors")
    sb = _tensors(tmp_path / "part/checkpoints/step_0000004/state.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("dopt.") for k in sa) and any(k.startswith("ema.") for k in sa)
    rows = (tmp_path / "part" / "loss.csv").read_text().splitlines()
    assert rows == (tmp_path / "whole" / "loss.csv").read_text().splitlines() and len(rows) == 5

    source = _tensors(shapes / "small_vae.safetensors")
    frozen = [k for k in source if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(a[k], source[k]) for k in frozen)
    assert not all(torch.equal(a[k], source[k]) for k in a if k.startswith("decoder."))
    # The GAN counts from disc_start = 3 on: its columns are 0 before.
    csv_rows = [r.split(",") for r in rows[1:]]
    g_col = tv.LOSS_COLUMNS.index("g")
    assert [float(r[g_col]) == 0 for r in csv_rows] == [True, True, False, False]


def test_no_gan_contribution_before_disc_start(shapes, tmp_path):
    """With disc_start past the run, the discriminator changes nothing: the same VAE as without one, and D untouched."""
    plain = tv.train(_cfg(shapes, tmp_path / "plain"), progress=False)
    gan = tv.train(_cfg(shapes, tmp_path / "gan", discriminator=True, disc_start=100, disc_channels=8, disc_layers=2),
                   progress=False)
    a, b = _tensors(tmp_path / "plain/vae.safetensors"), _tensors(tmp_path / "gan/vae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and plain.losses == gan.losses
    state = _tensors(tmp_path / "gan/checkpoints/step_0000002/state.safetensors")
    torch.manual_seed(1)  # the trainer builds D with seed + 1
    fresh = disc_lib.NLayerDiscriminator(disc_lib.DiscriminatorConfig(channels=8, layers=2)).state_dict()
    assert all(torch.equal(state[f"disc.{k}"], v) for k, v in fresh.items())
    assert not any(k.startswith("dopt.") for k in state)  # D never stepped


def test_adaptive_weight_is_the_formula():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    rec = last(h)
    x = torch.randn(2, 3, 8, 8)
    rec_loss = (rec - x).abs().sum() / 2
    disc = disc_lib.NLayerDiscriminator(disc_lib.DiscriminatorConfig(channels=8, layers=1))
    g_loss = disc_lib.generator_loss(disc(rec))
    w = disc_lib.adaptive_weight(rec_loss, g_loss, last.weight, disc_weight=0.5)
    gr = torch.autograd.grad(rec_loss, last.weight, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, last.weight, retain_graph=True)[0]
    expected = 0.5 * (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad and float(w) > 0
    # a generator loss with no gradient there: clamped at 1e4 (times disc_weight)
    flat = (rec * 0).sum()
    assert float(disc_lib.adaptive_weight(rec_loss, flat, last.weight, 1.0)) == 1e4
    # hinge: 0.5 (mean relu(1 - real) + mean relu(1 + fake)); before disc_start the factor is 0
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(disc_lib.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert disc_lib.disc_factor(1.0, 4, 5) == 0.0 and disc_lib.disc_factor(1.0, 5, 5) == 1.0


def test_cli_end_to_end_and_official_layout(shapes, tmp_path, capsys):
    from sdxl.checkpoints.load import load_vae, load_vae_file
    from sdxl.checkpoints.vae_keys import official_vae_keys
    from sdxl.interfaces import cli
    from sdxl.training.lpips import LPIPS

    # LPIPS weight files in torchvision's and the lpips package's formats (random weights: the files' layout is
    # what matters here; tests/test_lpips.py checks the numbers)
    torch.manual_seed(0)
    lp = LPIPS()
    torch.save({f"features.{k}": v for k, v in lp.features.state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": m.weight.abs() for i, m in enumerate(lp.lins)}, tmp_path / "vgg.pth")
    config = tmp_path / "vae.toml"
    config.write_text(f'model = "{shapes / "small_vae.safetensors"}"\ndata = "{shapes / "data"}"\n'
                      'resolution = 32\nbucket_multiple = 8\nbatch_size = 2\nsteps = 3\nlr = 1e-3\n'
                      f'lpips_vgg = "{tmp_path / "vgg16.pth"}"\nlpips_linear = "{tmp_path / "vgg.pth"}"\n'
                      'decoder_only = true\nlog_every = 1\n'
                      f'output_dir = "{tmp_path / "run"}"\neval_data = "{shapes / "data"}"\neval_images = 2\n')
    assert cli.main(["train-vae", str(config), "--steps", "1"]) == 0
    out = tmp_path / "run"
    assert "1 steps done" in capsys.readouterr().out
    vae = load_vae_file(out / "vae.safetensors")
    assert vae.config == load_vae_file(shapes / "small_vae.safetensors").config
    names = {r.target if hasattr(r, "target") else r[0] for r in official_vae_keys(vae.config)}
    assert set(_tensors(out / "vae.safetensors")) <= names | set(vae.state_dict())  # official (encoder.down.*) names
    assert any(k.startswith("encoder.down.") for k in _tensors(out / "vae.safetensors"))
    assert torch.equal(load_vae(out / "vae.safetensors").decoder.conv_out.weight, vae.decoder.conv_out.weight)
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["images"] == 2 and evaluation["lpips"] > 0 and evaluation["psnr"] > 0
    lpips_col = tv.LOSS_COLUMNS.index("lpips")
    assert all(float(r.split(",")[lpips_col]) > 0 for r in (out / "loss.csv").read_text().splitlines()[1:])
    assert (out / "latest.txt").read_text().strip() == "step_0000001"
    # the recorded config runs again, and resumes to 2 steps
    assert cli.main(["train-vae", str(out / "config.toml"), "--resume", "latest", "--steps", "2"]) == 0
    assert (out / "latest.txt").read_text().strip() == "step_0000002"
    assert len((out / "loss.csv").read_text().splitlines()) == 3


def test_bad_input_is_one_line(shapes, tmp_path, capsys):
    from sdxl.interfaces import cli

    def run(text: str, *flags: str) -> str:
        config = tmp_path / "c.toml"
        config.write_text(text)
        assert cli.main(["train-vae", str(config), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sdxl train-vae: error: ") and "\n" not in err and "Traceback" not in err, err
        return err

    good = (f'model = "{shapes / "small_vae.safetensors"}"\ndata = "{shapes / "data"}"\nresolution = 32\n'
            f'bucket_multiple = 8\nbatch_size = 2\nsteps = 1\nperceptual_weight = 0\n'
            f'output_dir = "{tmp_path / "out"}"\n')
    assert f"{tmp_path / 'nothing'}: not a folder" in run(good.replace(str(shapes / "data"), str(tmp_path / "nothing")))
    assert "rec_loss must be one of 'l1', 'l2'" in run(good + 'rec_loss = "l3"\n')
    assert "overflows float16" in run(good + 'mixed_precision = "fp16"\n')
    assert "unknown key(s) kl_wieght (did you mean kl_weight?)" in run(good + "kl_wieght = 1\n")
    assert "decoder_only" in run(good.replace("model =", "init = \"tiny\"\n#") + "decoder_only = true\n")
    assert "needs both LPIPS weight files" in run(good.replace("perceptual_weight = 0", "perceptual_weight = 1"))
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    err = run(good.replace("perceptual_weight = 0", f'lpips_vgg = "{tmp_path / "bad.pth"}"\n'
                                                    f'lpips_linear = "{tmp_path / "bad.pth"}"'))
    assert "bad.pth" in err and "expected torchvision's VGG16 weights" in err
    assert not (tmp_path / "out").exists()  # nothing written by a run that could not start
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "vae.safetensors").write_bytes(b"an earlier run's")
    assert "holds an earlier run (vae.safetensors)" in run(good)
    assert (tmp_path / "out" / "vae.safetensors").read_bytes() == b"an earlier run's"
    assert "resume = 'latest' but" in run(good, "--resume", "latest")
    assert cli.main(["train-vae", str(tmp_path / "c.toml"), "--overwrite"]) == 0  # deletes the earlier run's file
    assert (tmp_path / "out" / "vae.safetensors").read_bytes()[:8] != b"an earli"


def test_example_config_reads(tmp_path):
    cfg = load_vae_config(Path(__file__).parent.parent / "configs" / "vae_finetune.toml")
    assert cfg.decoder_only and cfg.perceptual_weight > 0 and cfg.ema_decay and cfg.discriminator
    (tmp_path / "again.toml").write_text(cfg.to_toml())  # what a run records reads back the same
    assert load_vae_config(tmp_path / "again.toml") == cfg


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes(shapes, tmp_path, parallel):
    """Two CPU processes (gloo) under torchrun: DDP, or FSDP2 with per-rank training state; resumable."""
    import subprocess
    import sys

    from sdxl.checkpoints.load import load_vae_file

    config = tmp_path / "c.toml"
    config.write_text(f'model = "{shapes / "small_vae.safetensors"}"\ndata = "{shapes / "data"}"\nresolution = 32\n'
                      'bucket_multiple = 8\nbatch_size = 2\ngrad_accum = 2\nsteps = 2\nperceptual_weight = 0\n'
                      'discriminator = true\ndisc_start = 2\ndisc_channels = 8\ndisc_layers = 2\n'
                      f'parallel = "{parallel}"\noutput_dir = "{tmp_path / "run"}"\n')
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sdxl.training.train_vae"]
    for flags in ([], ["--resume", "latest", "--steps", "3"]):
        done = subprocess.run([*torchrun, str(config), *flags], capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    assert load_vae_file(tmp_path / "run" / "vae.safetensors").config.base_channels == SMALL.base_channels
    state = sorted(p.name for p in (tmp_path / "run/checkpoints/step_0000003").iterdir())
    assert ("state_rank1.safetensors" in state) == (parallel == "fsdp")
