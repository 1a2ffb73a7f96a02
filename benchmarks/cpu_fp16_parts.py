"""Where could float16 part sdxl's and diffusers' images? The full-size parts, checked on the CPU.

    python benchmarks/cpu_fp16_parts.py            # about 6 minutes on 2 cores
    python benchmarks/cpu_fp16_parts.py --tiny     # the same on tiny models (seconds)

1. Text: our two CLIP encoders against transformers' on the same random weights, both in float16:
   the penultimate-layer context and the pooled bigG embedding.
2. VAE: one decode in float16 against float32 (diffusers decodes SDXL's VAE in float32, `force_upcast`).
3. Sampling: diffusers keeps the latents in float16 between steps, sdxl in float32. Two runs of 30
   guided euler steps (cfg 5) with the full-size base U-Net in float32 on the same noise, one of them
   rounding its latents to float16 after every step, as diffusers does: does that rounding grow?
All weights are random (PyTorch's default initialisation, seeded); 256x256 images (32x32 latents).
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
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import transformers

    from sdxl.checkpoints.load import Components
    from sdxl.checkpoints.save import save_diffusers
    from sdxl.models import clip, unet, vae
    from sdxl.models.clip import CLIPTextEncoder
    from sdxl.models.tokenizer import clip_g_tokenizer, clip_l_tokenizer
    from sdxl.models.unet import UNet, micro_conditioning
    from sdxl.models.vae import AutoencoderKL
    from sdxl.conditioning import encode_prompts
    from sdxl.sampling import Denoiser, TrainingSchedule, make_plan

    torch.manual_seed(0)
    half = torch.float16
    prompt = "a red circle on a blue background, highly detailed photograph"

    # 1. Text encoders.
    l_config, g_config = (clip.clip_l_tiny, clip.clip_g_tiny) if args.tiny else (clip.clip_l, clip.clip_g)
    ours = [CLIPTextEncoder(c).to(half).eval() for c in (l_config, g_config)]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        # written as a diffusers folder (a tiny U-Net and VAE fill the other places), read by transformers
        save_diffusers(Components(kind="base", unet=UNet(unet.tiny), vae=AutoencoderKL(vae.tiny), text_encoder=ours[0],
                                  text_encoder_2=ours[1]), Path(tmp) / "model", dtype=half)
        refs = [transformers.CLIPTextModel.from_pretrained(Path(tmp) / "model" / "text_encoder", dtype=half).eval(),
                transformers.CLIPTextModelWithProjection.from_pretrained(Path(tmp) / "model" / "text_encoder_2",
                                                                         dtype=half).eval()]
        context, pooled = encode_prompts(*ours, [prompt], [prompt], hidden_layer=-2)
        out_l = refs[0](clip_l_tokenizer()([prompt]), output_hidden_states=True)
        out_g = refs[1](clip_g_tokenizer()([prompt]), output_hidden_states=True)
        ref_context = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        for what, a, b in (("text context", context, ref_context), ("pooled bigG", pooled, out_g.text_embeds)):
            d = (a.float() - b.float()).abs()
            print(f"{what}: max |sdxl - transformers| {d.max():.3e}, mean {d.mean():.3e} (std {b.float().std():.3f})")
    del ours, refs

    # 2. VAE, float16 against float32.
    latent = 8 if args.tiny else 32
    decoder = AutoencoderKL(vae.tiny if args.tiny else vae.base).eval()
    z = torch.randn(1, 4, latent, latent) * 12.0  # about the final latents' std here (scaled, as the pipeline's)
    with torch.inference_mode():
        full = decoder.decode(decoder.unscale_latents(z))
        halved = decoder.half().decode(decoder.unscale_latents(z).half()).float()
    pixels = [(x.clamp(-1, 1) + 1) * 127.5 for x in (full, halved)]
    d = (pixels[0] - pixels[1]).abs()
    print(f"VAE decode float16 vs float32: max {d.max():.2f}/255, mean {d.mean():.3f}/255")
    del decoder

    # 3. Sampling: latents kept in float32, or rounded to float16 after each step.
    t0 = time.perf_counter()
    model = UNet(unet.tiny if args.tiny else unet.base).eval()
    config = model.config
    print(f"U-Net built in {time.perf_counter() - t0:.0f} s")
    width = config.adm_in_channels - 6 * config.addition_time_embed_dim
    sizes = [latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]
    context = torch.randn(2, 77, config.context_dim) * 2.7  # about the full-size encoders' std above
    context[0] = 0  # the empty negative prompt: zeros, as SDXL base does
    y = torch.cat([micro_conditioning(torch.zeros(1, width), sizes, dim=config.addition_time_embed_dim),
                   micro_conditioning(torch.randn(1, width), sizes, dim=config.addition_time_embed_dim)])

    def guided(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = model(torch.cat([x_in, x_in]), t, context, y).chunk(2)
        return uncond + 5.0 * (cond - uncond)

    training = TrainingSchedule()
    plan = make_plan(training, "euler", "default", args.steps)
    denoise = Denoiser(guided, training, plan)
    sigmas = plan.sigmas.tolist()
    kept = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)) * plan.init_noise_sigma
    rounded = kept.half().float()
    with torch.inference_mode():
        for i in range(len(sigmas) - 1):
            for_kept, for_rounded = denoise(kept, sigmas[i]), denoise(rounded, sigmas[i])
            kept = kept + (kept - for_kept) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            rounded = rounded + (rounded - for_rounded) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            rounded = rounded.half().float()  # what diffusers' euler does after each step
            if i in (0, len(sigmas) // 2, len(sigmas) - 2):
                rel = ((kept - rounded).norm() / kept.norm()).item()
                print(f"after step {i + 1:2d}: latents rounded to float16 each step differ from float32 ones by "
                      f"{rel:.2e} (relative), max {(kept - rounded).abs().max():.3e} (std {kept.std():.2f})", flush=True)


if __name__ == "__main__":
    main()
