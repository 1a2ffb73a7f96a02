"""End to end on a GPU: sdxl against diffusers' StableDiffusionXLPipeline on the same weights.

    python benchmarks/gpu_generate.py            # full-size base, 1024x1024, 30 euler steps, cfg 5, fp16
    python benchmarks/gpu_generate.py --tiny     # the same script on tiny models (a CPU dry run)

Random full-size weights are made in our models, written as a diffusers folder by our writer, and
loaded from it by diffusers, so both pipelines hold the same weights. Each pipeline runs once to
warm up, then is timed over --runs images; the images of the two are compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="float32 (TF32 off): exact comparison")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import diffusers

    from sdxl.checkpoints.load import Components
    from sdxl.checkpoints.save import save_diffusers
    from sdxl.models import clip, unet, vae
    from sdxl.models.clip import CLIPTextEncoder
    from sdxl.models.unet import UNet
    from sdxl.models.vae import AutoencoderKL
    from sdxl.pipeline import Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" and not args.fp32 else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    size = 64 if args.tiny else 1024
    presets = (unet.tiny, vae.tiny, clip.clip_l_tiny, clip.clip_g_tiny) if args.tiny else (unet.base, vae.base, clip.clip_l, clip.clip_g)
    torch.manual_seed(0)
    with torch.device(device):
        parts = Components(kind="base", unet=UNet(presets[0]), vae=AutoencoderKL(presets[1]),
                           text_encoder=CLIPTextEncoder(presets[2]), text_encoder_2=CLIPTextEncoder(presets[3]))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        setattr(parts, name, getattr(parts, name).to(dtype).eval().requires_grad_(False))
    ours = Pipeline(parts)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_diffusers(parts, Path(tmp) / "model", dtype=dtype)
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(Path(tmp) / "model", torch_dtype=dtype).to(device)
        print(f"wrote and loaded the diffusers folder in {time.perf_counter() - t:.1f} s")
    ref.set_progress_bar_config(disable=True)

    prompt = "a red circle on a blue background, highly detailed photograph"

    def run_ours():
        return ours.generate(prompt, width=size, height=size, steps=args.steps, cfg=5.0, sampler="euler", seed=0, output="np")[0]

    def run_ref():
        return ref(prompt, num_inference_steps=args.steps, guidance_scale=5.0, width=size, height=size,
                   generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, fn in (("diffusers", run_ref), ("sdxl", run_ours)):
        image = fn()  # warm-up
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.runs):
            image = fn()
        sync()
        seconds = (time.perf_counter() - t) / args.runs
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        results[name] = (seconds, peak, torch.as_tensor(image).float())
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {name}, {dtype}, {size}x{size}, "
          f"{args.steps} euler steps, cfg 5, batch 1")
    for k, (s, p, img) in results.items():
        print(f"{k:<9} {s:6.2f} s per image   peak GPU memory {p:6.2f} GiB (both pipelines resident)   image std {img.std():.3f}")
    print(f"ratio sdxl / diffusers: {results['sdxl'][0] / results['diffusers'][0]:.2f}")
    diff = (results["sdxl"][2] - results["diffusers"][2]).abs() * 255
    print(f"pixel difference: max {diff.max():.2f}/255, mean {diff.mean():.3f}/255")


if __name__ == "__main__":
    main()
