"""An fp16-safe copy of a VAE: same outputs, internal activations small enough for float16.

The official SDXL VAE's decoder has activations past float16's largest value (65504), so it decodes to
NaN/inf in half precision (the pipeline then re-runs it in float32: `AutoencoderKL.overflowed_in_half`).
madebyollin's "sdxl-vae-fp16-fix" fixed it by fine-tuning the decoder to "keep the final output the same but
make the internal activation values smaller, by scaling down weights and biases within the network"
(huggingface.co/madebyollin/sdxl-vae-fp16-fix). This module does the same in two steps:

1. `rescale_decoder`: exact (power-of-two) rescaling where the architecture allows it. Every reader of the
   decoder's residual stream is a GroupNorm (norm1, the attention's norm, norm_out), which ignores its input's
   scale, so the stream may carry any scale s: its writers (conv_in; each res block's conv2; the attention's
   proj_out) scale weights and biases by s, and where the stream passes through a linear map (a width-changing
   `nin_shortcut`, an upsample conv) its scale may change from a to b (weight x b/a, bias x b). Inside a res
   block, conv1 feeds norm2: its scale is free too; so is the attention's v (proj_out's weight compensates).
2. `fine_tune`: what scaling cannot reach, by training a copy of the decoder on
   L1(decoded, the original's float32 decoding of the same latents) + weight x sum over modules of
   relu(max |output| / target - 1), the maxima read by forward hooks; it stops as soon as float16 decoding
   of the check latents is finite with every block under 2 x target.

`activation_report(vae, latents, dtype)` is the diagnosis on its own: the largest |activation| of each decoder
block (post_quant_conv, conv_in, mid.block_1, mid.attn_1, mid.block_2, up.N-1 ... up.0, norm_out, conv_out),
inf where it overflowed. `sdxl fix-vae-fp16` (`main`) prints it before and after and writes the fixed VAE as an
official-layout VAE file (`sdxl generate --vae FILE`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.files import save_tensors
from ..checkpoints.keymap import invert
from ..checkpoints.official import METADATA_CONFIGS
from ..checkpoints.vae_keys import official_vae_keys
from ..models.vae import AttnBlock, AutoencoderKL, ResnetBlock, Upsample

FP16_MAX = 65504.0  # torch.finfo(torch.float16).max
# What rescaling and the penalty aim for: 8x below FP16_MAX, since other latents (other images, larger sizes)
# reach past the maxima measured on the training latents. A power of two, so scales are exact.
TARGET = 2.0**13
STREAM_PARTS = ("", ".conv2", ".nin_shortcut", ".proj_out", ".conv")  # a unit's outputs carried at stream scale


# ---------------------------------------------------------------------------------------------
# Measuring: forward hooks on every module of the decoder.


def report_blocks(vae: AutoencoderKL) -> list[str]:
    """The decoder's blocks in the order they run (post_quant_conv first: the decoder's input)."""
    ups = [f"up.{i}" for i in reversed(range(len(vae.config.channel_mult)))]
    mid = ["mid.block_1", *(["mid.attn_1"] if vae.config.mid_attention else []), "mid.block_2"]
    return ["post_quant_conv", "conv_in", *mid, *ups, "norm_out", "conv_out"]


def block_of(name: str) -> str:
    """The report block a module belongs to: `up.1.block.0.conv1` -> `up.1`, `mid.attn_1.q` -> `mid.attn_1`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("mid", "up") else parts[0]


def decoding_modules(vae: AutoencoderKL) -> dict[str, nn.Module]:
    """Every module that runs in `decode`, by its name in the decoder (post_quant_conv under its own)."""
    return {"post_quant_conv": vae.post_quant_conv, **{n: m for n, m in vae.decoder.named_modules() if n}}


@contextmanager
def record_maxima(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Within the block, name -> max |output| (a 0-d tensor, in the graph when grad is on) of each module,
    the largest over the forwards run."""
    maxima: dict[str, Tensor] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs, output: Tensor) -> None:
            m = output.abs().amax().float()
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield maxima
    finally:
        for h in handles:
            h.remove()


def in_dtype(vae: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    """`vae` itself if its weights are in `dtype`, else a converted copy (so the caller's VAE is untouched)."""
    if next(vae.parameters()).dtype == dtype:
        return vae
    return copy.deepcopy(vae).to(dtype)


@torch.no_grad()
def module_maxima(vae: AutoencoderKL, latents: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Module name -> max |output| over decoding each latent (B, 4, h, w) on its own in `dtype`; inf where a
    value was not finite (NaN included)."""
    model = in_dtype(vae, dtype)
    device = next(model.parameters()).device
    with record_maxima(decoding_modules(model)) as maxima:
        for z in latents:
            model.decode(z[None].to(device, dtype))
    values = {name: float(m) for name, m in maxima.items()}
    return {name: v if math.isfinite(v) else math.inf for name, v in values.items()}


def activation_report(vae: AutoencoderKL, latents: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Decoder block -> the largest |activation| of any module in it when decoding `latents` in `dtype`
    (inf: overflowed). Blocks in `report_blocks` order."""
    maxima = module_maxima(vae, latents, dtype)
    report = dict.fromkeys(report_blocks(vae), 0.0)
    for name, v in maxima.items():
        block = block_of(name)
        if block in report:
            report[block] = max(report[block], v)
    return report


@torch.no_grad()
def output_difference(fixed: AutoencoderKL, original: AutoencoderKL, latents: Tensor,
                      dtype: torch.dtype = torch.float16) -> dict[str, float]:
    """max / mean |fixed decoded in `dtype` - original decoded in float32| over `latents` (images in [-1, 1]),
    and the fraction of non-finite values; each latent decoded on its own."""
    model, reference = in_dtype(fixed, dtype), in_dtype(original, torch.float32)
    device = next(model.parameters()).device
    biggest, total, count, bad = 0.0, 0.0, 0, 0
    for z in latents:
        got = model.decode(z[None].to(device, dtype)).float()
        want = reference.decode(z[None].to(device, torch.float32))
        finite = torch.isfinite(got)
        bad += int((~finite).sum())
        diff = (got - want).abs()[finite]
        biggest = max(biggest, float(diff.max())) if diff.numel() else biggest
        total, count = total + float(diff.sum()), count + got.numel()
    return {"max_abs": biggest if not bad else math.inf, "mean_abs": total / count if not bad else math.inf,
            "nonfinite": bad / count}


# ---------------------------------------------------------------------------------------------
# Step 1: exact rescaling.


def stream_units(vae: AutoencoderKL) -> list[tuple[str, nn.Module]]:
    """The modules that write the decoder's residual stream, in the order they run."""
    d, units = vae.decoder, [("conv_in", vae.decoder.conv_in), ("mid.block_1", vae.decoder.mid.block_1)]
    if vae.config.mid_attention:
        units.append(("mid.attn_1", d.mid.attn_1))
    units.append(("mid.block_2", d.mid.block_2))
    for i in reversed(range(len(d.up))):
        units += [(f"up.{i}.block.{j}", b) for j, b in enumerate(d.up[i].block)]
        if i > 0:  # level 0 has no upsampling (as Decoder.__init__)
            units.append((f"up.{i}.upsample", d.up[i].upsample))
    return units


def starts_segment(unit: nn.Module) -> bool:
    """Whether the stream's scale may change at this unit: a linear map on the stream (conv_in, a width-changing
    shortcut, an upsample conv); elsewhere the stream passes through an identity and keeps its scale."""
    return isinstance(unit, (nn.Conv2d, Upsample)) or (isinstance(unit, ResnetBlock)
                                                       and isinstance(unit.nin_shortcut, nn.Conv2d))


def power_of_two_scale(largest: float, target: float) -> float:
    """The largest power of two s <= 1 with largest * s <= target (1 if already there)."""
    if not largest > target:
        return 1.0
    if not math.isfinite(largest):
        raise ValueError("the float32 decoding itself is not finite: there is nothing to keep the same")
    return 2.0 ** math.floor(math.log2(target / largest))


def stream_scales(units: list[tuple[str, nn.Module]], maxima: dict[str, float], target: float) -> list[float]:
    """Per unit, the scale its stream segment gets: what brings the segment's largest value to `target`."""
    segments: list[list[int]] = []
    for k, (_, unit) in enumerate(units):
        if starts_segment(unit) or not segments:
            segments.append([])
        segments[-1].append(k)
    scales = [1.0] * len(units)
    for seg in segments:
        largest = max(maxima.get(units[k][0] + part, 0.0) for k in seg for part in STREAM_PARTS)
        for k in seg:
            scales[k] = power_of_two_scale(largest, target)
    return scales


def _scale_(conv: nn.Conv2d, weight: float, bias: float) -> None:
    conv.weight.mul_(weight)
    if conv.bias is not None:
        conv.bias.mul_(bias)


def _rescale_conv(unit: nn.Conv2d, a: float, b: float, name: str, maxima: dict[str, float], target: float) -> None:
    _scale_(unit, b / a, b)  # conv_in: its input (the latents) is at scale a = 1


def _rescale_upsample(unit: Upsample, a: float, b: float, name: str, maxima: dict[str, float], target: float) -> None:
    _scale_(unit.conv, b / a, b)  # nearest upsampling keeps the input's scale a


def _rescale_res(unit: ResnetBlock, a: float, b: float, name: str, maxima: dict[str, float], target: float) -> None:
    if isinstance(unit.nin_shortcut, nn.Conv2d):
        _scale_(unit.nin_shortcut, b / a, b)
    elif a != b:
        raise AssertionError(f"{name}: an identity shortcut cannot change the stream's scale")
    t = power_of_two_scale(maxima.get(f"{name}.conv1", 0.0), target)
    _scale_(unit.conv1, t, t)  # norm2 follows: exact
    _scale_(unit.conv2, b, b)  # reads norm2's output (scale 1), writes the stream (scale b)


def _rescale_attn(unit: AttnBlock, a: float, b: float, name: str, maxima: dict[str, float], target: float) -> None:
    t = power_of_two_scale(maxima.get(f"{name}.v", 0.0), target)
    _scale_(unit.v, t, t)  # attention weights sum to 1 over positions: the output of attention scales with v
    _scale_(unit.proj_out, b / t, b)


RESCALE = {nn.Conv2d: _rescale_conv, Upsample: _rescale_upsample, ResnetBlock: _rescale_res, AttnBlock: _rescale_attn}


@torch.no_grad()
def rescale_decoder(vae: AutoencoderKL, latents: Tensor, target: float = TARGET) -> dict[str, float]:
    """Rescale `vae`'s decoder in place, exactly but for GroupNorm's epsilon, so that every stream segment and
    every free internal (conv1, v) peaks at most at `target` on `latents` (float32). Unit -> its stream scale."""
    maxima = module_maxima(vae, latents, torch.float32)
    units = stream_units(vae)
    scales = stream_scales(units, maxima, target)
    a = 1.0
    for (name, unit), b in zip(units, scales, strict=True):
        RESCALE[type(unit)](unit, a, b, name, maxima, target)
        a = b
    return {name: s for (name, _), s in zip(units, scales, strict=True)}


# ---------------------------------------------------------------------------------------------
# Step 2: fine-tuning against the original's output.


def fits_half(vae: AutoencoderKL, latents: Tensor, target: float = TARGET) -> bool:
    """Float16 decoding of `latents` is finite with every block under 2 x target (headroom for other latents)."""
    return max(activation_report(vae, latents, torch.float16).values()) < 2 * target


def activation_penalty(maxima: dict[str, Tensor], target: float) -> Tensor:
    """sum over modules of relu(max |output| / target - 1): zero once every module is under `target`."""
    return torch.stack([F.relu(m / target - 1) for m in maxima.values()]).sum()


@dataclass
class FineTune:
    steps: int = 200  # at most; it stops when `fits_half` holds on the check latents
    lr: float = 1e-5  # Adam; small: the copy starts where the original is (or exactly, after rescaling)
    penalty_weight: float = 1.0  # the activation penalty's weight against the L1 output loss
    target: float = TARGET
    check_every: int = 10  # steps between float16 checks


def relative_lr_groups(module: nn.Module, lr: float) -> list[dict]:
    """One Adam group per tensor with lr x the tensor's RMS: Adam moves each weight by about its lr per step
    whatever its scale, and rescaling leaves tensors of very different scales (a compensating conv at 1/64 of
    its neighbours would otherwise change 64x faster). A zero tensor stays as it is."""
    return [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt())} for p in module.parameters()]


def fine_tune(fixed: AutoencoderKL, original: AutoencoderKL, next_latents: Callable[[], Tensor], check: Tensor,
              opts: FineTune, log: Callable[[str], None] = lambda s: None) -> int:
    """Train `fixed`'s decoder (in place, float32) to decode as `original` (float32) does while its activations
    fall under `opts.target`; the steps taken (0 when `check` already decodes fine in float16)."""
    opt = torch.optim.Adam(relative_lr_groups(fixed.decoder, opts.lr))
    modules = decoding_modules(fixed)
    try:
        for step in range(opts.steps):
            if step % opts.check_every == 0 and fits_half(fixed, check, opts.target):
                return step
            fixed.decoder.requires_grad_(True)
            z = next_latents()
            with torch.no_grad():
                want = original.decode(z)
            with record_maxima(modules) as maxima:
                got = fixed.decode(z)
            out_loss = (got - want).abs().mean()
            penalty = activation_penalty(maxima, opts.target)
            (out_loss + opts.penalty_weight * penalty).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # no gradients copied along by the float16 checks
            if step % opts.check_every == 0:
                log(f"step {step}: L1 {out_loss.item():.5f}, penalty {penalty.item():.4f}")
        return opts.steps
    finally:
        fixed.decoder.requires_grad_(False)


def make_fp16_safe(vae: AutoencoderKL, train: Callable[[], Tensor], check: Tensor, opts: FineTune | None = None,
                   log: Callable[[str], None] = lambda s: None) -> tuple[AutoencoderKL, int]:
    """A fixed copy of `vae` (float32; `vae` and the copy's encoder untouched) and the fine-tuning steps taken.
    train(): a batch of raw latents for each step; check: latents measured for rescaling and the stop test."""
    opts = opts or FineTune()
    original = in_dtype(vae, torch.float32).eval().requires_grad_(False)
    fixed = copy.deepcopy(original)
    rescale_decoder(fixed, check, opts.target)
    steps = fine_tune(fixed, original, train, check, opts, log)
    fixed.config = replace(fixed.config, force_upcast=False)  # diffusers' flag: this VAE need not run in float32
    return fixed, steps


# ---------------------------------------------------------------------------------------------
# Latents, saving, the command.


def random_latents(vae: AutoencoderKL, n: int, size: int, generator: torch.Generator) -> Tensor:
    """n raw latents for `size` x `size` images, N(0, 1/scaling_factor^2) as the diffusion model's N(0, 1)."""
    f = vae.config.downscale_factor
    z = torch.randn((n, vae.config.latent_channels, size // f, size // f), generator=generator)
    return z / vae.config.scaling_factor


def image_latents(vae: AutoencoderKL, folder: str | Path, size: int) -> Tensor:
    """The latent means of the folder's images (sorted by name), each centre-cropped square and resized to
    `size`, encoded one at a time by `vae`'s (frozen) encoder in float32; on the CPU."""
    from ..images import load_image, resize, to_tensor

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--data {folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ValueError(f"--data {folder}: needs at least 2 images (some are held out for the report)")
    model = in_dtype(vae, torch.float32)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for p in files:
            im = load_image(p, what="--data")
            side = min(im.size)
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            im = resize(im.crop((left, top, left + side, top + side)), size, size)
            out.append(model.encode(to_tensor(im).to(device)).cpu())
    return torch.cat(out)


def save_vae(vae: AutoencoderKL, path: str | Path) -> None:
    """`vae` as a standalone VAE file: official names (`decoder.up.0.block.0.conv1.weight`, as sdxl_vae.safetensors),
    float32, its config (force_upcast False) in the metadata; `load_vae_file` reads it back."""
    state = invert(vae.state_dict(), official_vae_keys(vae.config))
    save_tensors({k: v.float() for k, v in state.items()}, path,
                 metadata={METADATA_CONFIGS: json.dumps({"vae": asdict(vae.config)})})


def format_report(columns: dict[str, dict[str, float]]) -> str:
    """A table: one row per block, one column per report (title -> block -> max |activation|)."""
    blocks = list(next(iter(columns.values())))
    head = f"{'block':<16}" + "".join(f"{title:>18}" for title in columns)
    rows = [f"{b:<16}" + "".join(f"{_magnitude(col[b]):>18}" for col in columns.values()) for b in blocks]
    return "\n".join([head, *rows])


def _magnitude(v: float) -> str:
    return "inf (overflow)" if not math.isfinite(v) else f"{v:.4g}" + (" !" if v > FP16_MAX else "")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through sdxl.interfaces.errors, as every sdxl command's mistakes
        raise ValueError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sdxl fix-vae-fp16", description="Make a copy of a VAE whose decoder runs in float16 without "
                "overflowing (madebyollin's sdxl-vae-fp16-fix recipe), or --report-only its activation maxima.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vae", required=True, help="the VAE to fix: a VAE .safetensors file (official or diffusers "
                   "names) or a diffusers VAE folder")
    p.add_argument("--out", help="the fixed VAE's new .safetensors file (required unless --report-only)")
    p.add_argument("--data", help="a folder of images whose latents to train and measure on (default: random latents)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps at most (it stops once float16 is safe)")
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate for the fine-tuning")
    p.add_argument("--size", type=int, default=512, help="image size (pixels, square) of the training latents")
    p.add_argument("--seed", type=int, default=0, help="seed of the random latents and the batch order")
    p.add_argument("--device", help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--report-only", action="store_true", help="print the per-block table of --vae and stop")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would fail late, before the VAE loads."""
    if args.steps < 0 or args.lr <= 0:
        raise ValueError("--steps must be >= 0 and --lr > 0")
    if args.size <= 0 or args.size % 8:
        raise ValueError(f"--size {args.size}: a positive multiple of 8 (the VAE's downscaling), please")
    if not Path(args.vae).exists():
        raise FileNotFoundError(f"--vae {args.vae}: no such file or folder")
    if args.report_only:
        return
    if not args.out:
        raise ValueError("--out FILE.safetensors is required (or --report-only)")
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"--out {args.out}: the fixed VAE is written as a .safetensors file")
    if out.exists() or out.is_symlink():
        raise ValueError(f"--out {args.out} already exists; choose a new path (nothing is overwritten)")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"--out {args.out}: the folder {out.absolute().parent} does not exist")


def pick_device(name: str | None) -> torch.device:
    """--device, checked: cuda if available else cpu by default."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here")
    return device


def latent_sources(vae: AutoencoderKL, args: argparse.Namespace) -> tuple[Callable[[], Tensor], Tensor, Tensor]:
    """(a batch of training latents per call, check latents, held-out latents), on the VAE's device."""
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(args.seed)
    if args.data:
        pool = image_latents(vae, args.data, args.size)
        n_held = max(1, len(pool) // 5)
        train, held = pool[:-n_held], pool[-n_held:]

        def next_latents() -> Tensor:
            z = train[int(torch.randint(len(train), (1,), generator=gen))][None]
            return (z.flip(-1) if torch.rand((), generator=gen) < 0.5 else z).to(device)

        return next_latents, train[:4].to(device), held.to(device)
    check = random_latents(vae, 4, args.size, gen).to(device)
    held = random_latents(vae, 4, args.size, torch.Generator().manual_seed(args.seed + 1)).to(device)
    return lambda: random_latents(vae, 1, args.size, gen).to(device), check, held


def main(argv: list[str] | None, publish: Callable[[str, Callable[[Path], None]], object]) -> int:
    """`sdxl fix-vae-fp16`: mistakes raise ValueError / OSError with one line (sdxl.interfaces.errors says it).
    publish(path, write): how the output file is made (the command line's `outputs.create_new`: written under a
    temporary name, linked into place, never over a file that appeared meanwhile)."""
    from ..checkpoints.load import load_vae

    args = build_parser().parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    vae = load_vae(args.vae, dtype=torch.float32, device=device)
    next_latents, check, held = latent_sources(vae, args)
    before = {"float32": activation_report(vae, held, torch.float32),
              "float16": activation_report(vae, held, torch.float16)}
    if args.report_only:
        print(format_report(before))
        _verdict(before["float16"])
        return 0
    opts = FineTune(steps=args.steps, lr=args.lr)
    fixed, steps = make_fp16_safe(vae, next_latents, check, opts, log=print)
    after = {"fixed float32": activation_report(fixed, held, torch.float32),
             "fixed float16": activation_report(fixed, held, torch.float16)}
    print(format_report({"original float32": before["float32"], "original float16": before["float16"], **after}))
    print(f"fine-tuning steps: {steps}")
    for dtype in (torch.float16, torch.float32):
        d = output_difference(fixed, vae, held, dtype)
        print(f"fixed {str(dtype).removeprefix('torch.')} vs original float32 on {len(held)} held-out latents: "
              f"max abs {d['max_abs']:.4g}, mean abs {d['mean_abs']:.4g}, non-finite {d['nonfinite']:.2%}")
    _verdict(after["fixed float16"])
    if max(after["fixed float16"].values()) > FP16_MAX:
        raise ValueError(f"still overflows float16 after {steps} steps: not written; try more --steps or --data")
    publish(args.out, lambda tmp: save_vae(fixed, tmp))
    print(f"wrote {args.out} (official VAE layout, float32 weights; `sdxl generate --vae {args.out}`)")
    return 0


def _verdict(report: dict[str, float]) -> None:
    over = [b for b, v in report.items() if not v <= FP16_MAX]
    print(f"float16: {len(over)} of {len(report)} blocks overflow" + (f" ({', '.join(over)})" if over else ""))

