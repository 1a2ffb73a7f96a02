"""Full-size checks on a GPU: our SDXL base U-Net against diffusers', and loading to the GPU.

    python benchmarks/gpu_check.py            # needs CUDA and diffusers (a test-only dependency)

1. Parity at full size: diffusers' UNet2DConditionModel with the official base config and random
   weights; the same weights through our diffusers key map into our U-Net; outputs compared in
   float32 (TF32 off) and in float16.
2. Speed of one U-Net step (batch 2 = classifier-free guidance, 1024x1024 -> 128x128 latents, fp16,
   eager, no compilation) for both, with peak GPU memory: a first look for the speed work.
3. Loading a full-size official-layout base file onto the GPU in fp16 against reading the file.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
HERE = Path(__file__).resolve().parent


def bench(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def unet_parity_and_speed() -> None:
    import diffusers

    from sdxl.checkpoints.keymap import check_shapes, convert
    from sdxl.checkpoints.unet_keys import diffusers_unet_keys, unet_config_from_diffusers
    from sdxl.models.unet import UNet, micro_conditioning

    manifest = json.loads((HERE.parent / "tests/data/checkpoint-keys/diffusers_base.json").read_text())
    config = manifest["unet"]["config_used"]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).cuda().eval()
    ours_cfg = unet_config_from_diffusers(config)
    with torch.device("meta"):
        ours = UNet(ours_cfg)
    state = convert(ref.state_dict(), diffusers_unet_keys(ours_cfg), where="diffusers unet")
    check_shapes(state, ours, where="diffusers unet")
    ours.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True, strict=True)
    ours.eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g).cuda()
    t = torch.tensor([999.0, 421.0]).cuda()
    ctx = torch.randn(2, 77, 2048, generator=g).cuda()
    pooled = torch.randn(2, 1280, generator=g).cuda()
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 1024, 1024]]).cuda()
    y = micro_conditioning(pooled, time_ids)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        a = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        b = ours(x, t, ctx, y)
    print(f"full-size base U-Net, float32 (TF32 off), 64x64 latents: max |diff| {(a - b).abs().max().item():.2e}, "
          f"output std {a.std().item():.3f}")

    ref.half()
    ours.half()
    x, t, ctx, y, pooled, time_ids = (v.half() for v in (x, t, ctx, y, pooled, time_ids))
    with torch.no_grad():
        a = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        b = ours(x, t, ctx, y)
    print(f"float16: max |diff| {(a.float() - b.float()).abs().max().item():.2e}")

    x = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)
    results = {}
    for name, fn in (
        ("diffusers", lambda: ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})),
        ("sdxl", lambda: ours(x, t, ctx, y)),
    ):
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            ms = bench(fn)
        results[name] = (ms, torch.cuda.max_memory_allocated() / 2**30)
    for name, (ms, gib) in results.items():
        print(f"U-Net step, batch 2, 128x128 latents, fp16 eager: {name:<9} {ms:6.1f} ms   peak {gib:5.2f} GiB")
    print(f"ratio sdxl / diffusers: {results['sdxl'][0] / results['diffusers'][0]:.2f}")
    del ref, ours
    torch.cuda.empty_cache()


def load_to_gpu() -> None:
    sys.path.insert(0, str(HERE))
    from load_memory import make_file

    from sdxl.checkpoints.load import load_single_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.safetensors"
        make_file(path)
        for _ in range(2):  # the second pass is with the file in the page cache
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(64 << 20)
                while f.readinto(buf):
                    pass
            read = time.perf_counter() - start
        start = time.perf_counter()
        parts = load_single_file(path, dtype=torch.float16, device="cuda")
        torch.cuda.synchronize()
        load = time.perf_counter() - start
        n = sum(p.numel() for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2) for p in m.parameters())
        print(f"load {path.stat().st_size / 2**30:.2f} GiB official base file -> cuda fp16: {load:.2f} s; "
              f"reading the file {read:.2f} s; ratio {load / read:.2f}; {n:,} parameters on {next(parts.unet.parameters()).device}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, diffusers {__import__('diffusers').__version__}")
    unet_parity_and_speed()
    load_to_gpu()
