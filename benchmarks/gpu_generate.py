"""End to end on a GPU: sdxl against diffusers' SDXL pipelines on the same weights.

    python benchmarks/gpu_generate.py                     # base, 1024x1024, 30 euler steps, cfg 5, fp16, eager
    python benchmarks/gpu_generate.py --fp32 --runs 1 --steps 20   # float32, TF32 off: the exact comparison
    python benchmarks/gpu_generate.py --compile           # both U-Nets torch.compile'd (same mode, see --compile-mode)
    python benchmarks/gpu_generate.py --offload model     # weights in CPU memory, one model on the GPU at a time
    python benchmarks/gpu_generate.py --offload sequential
    python benchmarks/gpu_generate.py --fp8 --offload model   # the low-memory target: <= 4 GiB peak at 1024x1024
    python benchmarks/gpu_generate.py --refiner           # base + refiner, 40 steps, switch at 0.8
    python benchmarks/gpu_generate.py --size 2048 --vae-tiling --offload model   # 2048x2048, VAE in tiles (both)
    python benchmarks/gpu_generate.py --tiny [--compile | --offload MODE | --refiner | --fp16]   # tiny models: a CPU dry run

Random full-size weights are made in our models, written as diffusers folders by our writer, and
loaded from them by diffusers, so both pipelines hold the same weights. Each pipeline is measured
with only its own weights on the GPU (the other's wait in CPU memory), so each peak GPU memory
figure is that pipeline's alone. A pipeline runs one image to warm up (with --compile: the
compilation, reported as the warm-up time), then is timed over --runs images; with --compile the
script counts the graphs compiled during the timed images, which must be 0 (no recompilation for a
second image of the same size). With --offload, diffusers uses its own enable_model_cpu_offload /
enable_sequential_cpu_offload when `accelerate` is installed, and runs without offload otherwise
(said in the output). In float16 both decode in float32, as both do with the official VAE, which
overflows float16 (diffusers: `force_upcast`; sdxl: the VAE marked as one that overflowed). The two
pipelines' last images are compared pixel by pixel, and so are what they had before decoding (the
prompt's text conditioning, the final latents), which says where two images that differ parted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (a dry run; on the CPU without CUDA)")
    parser.add_argument("--fp32", action="store_true", help="float32 (TF32 off): exact comparison")
    parser.add_argument("--fp16", action="store_true", help="float16 on the CPU too (with --tiny: a dry run of that path)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: 30, or 40 with --refiner")
    parser.add_argument("--compile", action="store_true", help="torch.compile both pipelines' U-Nets")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for both (default: sdxl's, sdxl.acceleration.COMPILE_MODE)")
    parser.add_argument("--offload", choices=("model", "sequential"), help="weights in CPU memory")
    parser.add_argument("--fp8", action="store_true",
                        help="sdxl keeps its U-Nets' linear weights in float8 (diffusers runs as it is)")
    parser.add_argument("--refiner", action="store_true", help="base + refiner, switching at --switch")
    parser.add_argument("--switch", type=float, default=0.8)
    parser.add_argument("--size", type=int, default=None, help="image width and height (default 1024; 64 with --tiny)")
    parser.add_argument("--vae-tiling", action="store_true", help="both pipelines decode in tiles")
    args = parser.parse_args()
    steps = args.steps or (40 if args.refiner else 30)

    import diffusers
    from torch._dynamo.utils import counters

    from sdxl.acceleration import COMPILE_MODE, compile_unet
    from sdxl.checkpoints.load import Components
    from sdxl.checkpoints.save import save_diffusers
    from sdxl.models import clip, unet, vae
    from sdxl.models.clip import CLIPTextEncoder
    from sdxl.models.unet import UNet
    from sdxl.models.vae import AutoencoderKL
    from sdxl.pipeline import Pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.float16 if (cuda or args.fp16) and not args.fp32 else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    size = args.size or (64 if args.tiny else 1024)
    mode = args.compile_mode or COMPILE_MODE

    def models(kind: str) -> Components:
        if kind == "base":
            u, v, l, g = (unet.tiny, vae.tiny, clip.clip_l_tiny, clip.clip_g_tiny) if args.tiny else \
                (unet.base, vae.base, clip.clip_l, clip.clip_g)
        else:
            u, v, l, g = (unet.tiny_refiner, vae.tiny, None, clip.clip_g_tiny) if args.tiny else \
                (unet.refiner, vae.base, None, clip.clip_g)
        with torch.device(device):  # random initialisation is fast on the GPU
            parts = Components(kind=kind, unet=UNet(u), vae=AutoencoderKL(v),
                               text_encoder=CLIPTextEncoder(l) if l is not None else None,
                               text_encoder_2=CLIPTextEncoder(g), force_zeros_for_empty_prompt=kind == "base")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(parts, name) is not None:
                setattr(parts, name, getattr(parts, name).to(dtype).eval().requires_grad_(False))
        return parts

    def place(parts: Components | None, where: str) -> None:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if parts is not None and getattr(parts, name) is not None:
                getattr(parts, name).to(where)

    torch.manual_seed(0)
    base = models("base")
    second = models("refiner") if args.refiner else None
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_diffusers(base, Path(tmp) / "base", dtype=dtype)
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(Path(tmp) / "base", torch_dtype=dtype)
        ref_refiner = None
        if second is not None:
            save_diffusers(second, Path(tmp) / "refiner", dtype=dtype)
            ref_refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(Path(tmp) / "refiner",
                                                                                    torch_dtype=dtype)
        print(f"wrote and loaded the diffusers folders in {time.perf_counter() - t:.1f} s", flush=True)
    place(base, "cpu")  # our weights wait in CPU memory while diffusers is measured
    place(second, "cpu")
    ref_pipes = [p for p in (ref, ref_refiner) if p is not None]
    for p in ref_pipes:
        p.set_progress_bar_config(disable=True)
        if args.vae_tiling:
            p.vae.enable_tiling()

    prompt = "a red circle on a blue background, highly detailed photograph"
    common = dict(num_inference_steps=steps, guidance_scale=5.0, width=size, height=size)

    # What each pipeline had before its VAE (the last image's): where two images differ, these say whether the
    # text conditioning, the sampling or the decoding parted them.
    seen: dict[str, torch.Tensor] = {}

    def ref_step_end(pipe, step, timestep, kw):  # keeps references only: no device reads inside the timed loop
        seen["ref latents"] = kw["latents"]
        if step == 0 and "prompt_embeds" in kw:
            seen["ref context"] = kw["prompt_embeds"][-1:]  # [negative, positive]: the positive
        return kw

    hooks = dict(callback_on_step_end=ref_step_end, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])

    def run_ref():
        g = [torch.Generator().manual_seed(0)]
        if ref_refiner is None:
            return ref(prompt, generator=g, output_type="np", **common, **hooks).images[0]
        latents = ref(prompt, generator=g, output_type="latent", denoising_end=args.switch, **common, **hooks).images
        return ref_refiner(prompt, image=latents, num_inference_steps=steps, guidance_scale=5.0, denoising_start=args.switch,
                           generator=g, output_type="np", callback_on_step_end=ref_step_end,
                           callback_on_step_end_tensor_inputs=["latents"]).images[0]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(fn) -> dict:
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        image = fn()  # warm-up (with --compile: compiles)
        sync()
        warmup = time.perf_counter() - t
        graphs = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        for _ in range(args.runs):
            image = fn()
        sync()
        return {
            "seconds": (time.perf_counter() - t) / args.runs, "warmup": warmup,
            "recompiled": counters["stats"]["unique_graphs"] - graphs,
            "peak": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "image": torch.as_tensor(image).float(),
        }

    # diffusers, alone on the GPU.
    ref_offload = "none"
    if args.offload:
        try:
            for p in ref_pipes:
                p.enable_model_cpu_offload(device=device) if args.offload == "model" else \
                    p.enable_sequential_cpu_offload(device=device)
            ref_offload = args.offload
        except (ImportError, RuntimeError, ValueError) as e:  # accelerate missing, or too old
            print(f"diffusers runs without offload ({type(e).__name__}: {str(e).splitlines()[0]})")
    if ref_offload == "none":
        for p in ref_pipes:
            p.to(device)
    if args.compile:
        for p in ref_pipes:
            compile_unet(p.unet, mode=mode)
    results = {"diffusers": measure(run_ref)}
    del ref, ref_refiner, ref_pipes, p  # frees its GPU memory before ours is measured
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # sdxl, alone on the GPU.
    if args.fp8:  # converted in CPU memory, before anything moves to the GPU
        from sdxl.acceleration import store_fp8

        for parts in (base, second):
            if parts is not None:
                store_fp8(parts.unet)
    if args.offload:
        ours = Pipeline(base, second, offload=args.offload, device=device, compile=mode if args.compile else False)
    else:
        place(base, device)
        place(second, device)
        ours = Pipeline(base, second, compile=mode if args.compile else False)

    def our_step(step, total, latents):
        if step == total:
            seen["sdxl latents"] = latents

    def run_ours():
        return ours.generate(prompt, width=size, height=size, steps=steps, cfg=5.0, sampler="euler", seed=0,
                             refiner_switch=args.switch, vae_tiling=args.vae_tiling, output="np", callback=our_step)[0]

    if dtype == torch.float16:
        # Decode in float32, as with the official VAE (it overflows float16, so after the first image our pipeline
        # decodes it in float32) and as diffusers does (force_upcast): random VAE weights would not overflow.
        for parts in (base, second):
            if parts is not None:
                parts.vae.overflowed_in_half = True
    results["sdxl"] = measure(run_ours)

    name = torch.cuda.get_device_name() if cuda else "cpu"
    what = "base + refiner (switch %.2f)" % args.switch if args.refiner else "base"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {name}, {dtype}, {size}x{size}, {what}, "
          f"{steps} euler steps, cfg 5, batch 1, {args.runs} timed image(s) after 1 warm-up")
    print(f"VAE decodes in float32 in both; compile: {mode if args.compile else 'no'}; VAE tiling: {'yes' if args.vae_tiling else 'no'}; offload: sdxl {args.offload or 'none'}, diffusers {ref_offload}; "
          f"fp8 U-Net linear weights: sdxl {'yes' if args.fp8 else 'no'}, diffusers no")
    for k, r in results.items():
        extra = f"   warm-up image {r['warmup']:6.1f} s, graphs compiled after it {r['recompiled']}" if args.compile else ""
        print(f"{k:<9} {r['seconds']:6.2f} s per image   peak GPU memory {r['peak']:6.2f} GiB (alone)   "
              f"image std {r['image'].std():.3f}{extra}")
    print(f"ratio sdxl / diffusers: time {results['sdxl']['seconds'] / results['diffusers']['seconds']:.2f}, "
          f"peak memory {results['sdxl']['peak'] / results['diffusers']['peak']:.2f}")
    diff = (results["sdxl"]["image"] - results["diffusers"]["image"]).abs() * 255
    print(f"pixel difference: max {diff.max():.2f}/255, mean {diff.mean():.3f}/255")
    context = next(iter(ours.prompts.entries.values()))[0].float().cpu()  # the prompt's (the negative is zeros)
    for what, a, b in (("text context", context, seen.get("ref context")),
                       ("final latents", seen.get("sdxl latents"), seen.get("ref latents"))):
        if a is not None and b is not None:
            a, b = a.float().cpu(), b.float().cpu()
            print(f"{what}: max |sdxl - diffusers| {(a - b).abs().max():.3e}, mean {(a - b).abs().mean():.3e} "
                  f"(diffusers' std {b.std():.3f})")


if __name__ == "__main__":
    main()
