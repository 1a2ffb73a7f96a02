"""One U-Net step on the CPU: our SDXL base U-Net against diffusers' UNet2DConditionModel, same weights.

    python benchmarks/cpu_unet_step.py             # full base config, float32, 512x512 (64x64 latents), batch 2
    python benchmarks/cpu_unet_step.py --tiny      # the same on the tiny config (a dry run, seconds)

Each measurement runs in its own fresh process (so peak RSS is that model's alone, and the two
10 GiB models are never in memory together), alternating sdxl, diffusers, sdxl, diffusers, ...
(--rounds), so that load from other work on the machine falls on both alike. A process builds its
model on the meta device, allocates it and fills every tensor in place from a generator seeded by
the tensor's index in our state dict, in our names; diffusers' tensors get our names through our
diffusers key table (`diffusers_unet_keys`, pure renames for SDXL), so both models hold identical
weights and neither pays for a random initialisation of its own. It then runs one step to warm up
and times --runs steps (batch 2 = batched classifier-free guidance) under torch.inference_mode.
The step includes the micro-conditioning embedding, which diffusers computes inside its forward.
The printed ratios are sdxl / diffusers of the median step times and of the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
HERE = Path(__file__).resolve().parent


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill_(tensors: dict[str, torch.Tensor]) -> None:
    """Deterministic weights in place, by position in our state dict: the same numbers in both processes.

    Matrices and kernels U(-1/sqrt(fan_in), +) (PyTorch's default Linear/Conv scale, so activations
    stay in range over 70 blocks), 1-d weights (norm scales) 1, biases U(-0.02, 0.02).
    """
    with torch.no_grad():
        for i, (name, t) in enumerate(tensors.items()):
            g = torch.Generator().manual_seed(i)
            if t.ndim >= 2:
                bound = t[0].numel() ** -0.5
                t.uniform_(-bound, bound, generator=g)
            elif name.endswith("weight"):
                t.fill_(1.0)
            else:
                t.uniform_(-0.02, 0.02, generator=g)


def inputs(batch: int, latent: int, config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = float(latent * 8)
    return {
        "x": torch.randn(batch, config.in_channels, latent, latent, generator=g),
        "t": torch.full((batch,), 500.0),
        "context": torch.randn(batch, 77, config.context_dim, generator=g),
        "pooled": torch.randn(batch, config.adm_in_channels - 6 * config.addition_time_embed_dim, generator=g),
        "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch),
    }


def child(args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file

    from sdxl.checkpoints.unet_keys import diffusers_unet_keys, unet_config_to_diffusers
    from sdxl.checkpoints.keymap import convert
    from sdxl.models import unet as unets
    from sdxl.models.unet import UNet, micro_conditioning

    config = unets.tiny if args.tiny else unets.base
    start = time.perf_counter()
    with torch.device("meta"):
        ours = UNet(config)
    if args.child == "sdxl":
        model = ours.to_empty(device="cpu")
        tensors = model.state_dict()
    else:
        import diffusers

        with torch.device("meta"):
            model = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(config))
        model.to_empty(device="cpu")
        # Our names -> diffusers' tensors (the same objects: the SDXL table only renames).
        tensors = convert(model.state_dict(), diffusers_unet_keys(config), where="diffusers unet")
        tensors = {name: tensors[name] for name in ours.state_dict()}  # our order
    fill_(tensors)
    model.eval().requires_grad_(False)
    built = time.perf_counter() - start
    rss_weights = memory_mib("VmRSS")

    d = inputs(args.batch, args.size // 8, config)
    if args.child == "sdxl":
        def step():
            y = micro_conditioning(d["pooled"], d["time_ids"], dim=config.addition_time_embed_dim)
            return model(d["x"], d["t"], d["context"], y)
    else:
        cond = {"text_embeds": d["pooled"], "time_ids": d["time_ids"]}

        def step():
            return model(d["x"], d["t"], encoder_hidden_states=d["context"], added_cond_kwargs=cond).sample

    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = step()
        warmup = time.perf_counter() - t0
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t0)
    save_file({"out": out.contiguous()}, args.out)
    return {
        "impl": args.child, "times": times, "median": statistics.median(times), "warmup": warmup, "build": built,
        "rss_weights_mib": rss_weights, "peak_rss_mib": memory_mib("VmHWM"),
        "weights_mib": sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20,
        "threads": torch.get_num_threads(), "out_std": out.std().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny U-Net config: a quick dry run")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    parser.add_argument("--child", choices=("sdxl", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import diffusers
    from safetensors.torch import load_file

    results: dict[str, list[dict]] = {"sdxl": [], "diffusers": []}
    flags = [f"--size={args.size}", f"--batch={args.batch}", f"--runs={args.runs}"] + (["--tiny"] if args.tiny else [])
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for impl in ("sdxl", "diffusers"):
                out = f"{tmp}/{impl}{r}.safetensors"
                proc = subprocess.run([sys.executable, __file__, "--child", impl, "--out", out, *flags],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{impl} process failed:\n{proc.stderr}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["output"] = load_file(out)["out"]
                results[impl].append(res)
                print(f"round {r + 1} {impl:<9}: steps {', '.join(f'{s:.2f}' for s in res['times'])} s "
                      f"(warm-up {res['warmup']:.2f} s, weights built in {res['build']:.1f} s), "
                      f"RSS with weights {res['rss_weights_mib']:,.0f} MiB, peak {res['peak_rss_mib']:,.0f} MiB",
                      flush=True)

    first = results["sdxl"][0]
    print(f"\ntorch {torch.__version__}, diffusers {diffusers.__version__}, {first['threads']} thread(s), float32, "
          f"{'tiny' if args.tiny else 'base'} U-Net ({first['weights_mib']:,.0f} MiB of weights), "
          f"{args.size}x{args.size} ({args.size // 8}x{args.size // 8} latents), batch {args.batch}")
    summary = {}
    for impl, rs in results.items():
        times = [s for r in rs for s in r["times"]]
        summary[impl] = (statistics.median(times), max(r["peak_rss_mib"] for r in rs))
        print(f"{impl:<9} median step {summary[impl][0]:.3f} s over {len(times)} steps in {len(rs)} processes "
              f"(min {min(times):.3f}, max {max(times):.3f}); peak RSS {summary[impl][1]:,.0f} MiB")
    print(f"ratio sdxl / diffusers: step time {summary['sdxl'][0] / summary['diffusers'][0]:.3f}, "
          f"peak RSS {summary['sdxl'][1] / summary['diffusers'][1]:.3f}")
    a, b = results["sdxl"][0]["output"], results["diffusers"][0]["output"]
    print(f"outputs: max |sdxl - diffusers| {(a - b).abs().max().item():.2e} (output std {b.std().item():.3f})")


if __name__ == "__main__":
    main()
