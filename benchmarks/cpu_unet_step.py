"""One U-Net step on the CPU: our SDXL base U-Net against diffusers' UNet2DConditionModel, same weights.

    python benchmarks/cpu_unet_step.py             # full base config, float32, 512x512 (64x64 latents), batch 2
    python benchmarks/cpu_unet_step.py --tiny      # the same on the tiny config (a dry run, seconds)
    python benchmarks/cpu_unet_step.py --compile   # eager and torch.compile'd, both implementations (4 processes a round)
    python benchmarks/cpu_unet_step.py --interleaved [--compile]   # all in one process, steps alternating
    python benchmarks/cpu_unet_step.py --interleaved --dtype bf16  # bfloat16 weights and activations in both

Each measurement runs in its own fresh process (so peak RSS is that model's alone, and the two
10 GiB models are never in memory together), alternating sdxl, diffusers, sdxl, diffusers, ...
(--rounds), so that load from other work on the machine falls on both alike. A process builds its
model on the meta device, allocates our state dict and fills every tensor in place from a generator
seeded by the tensor's index in it; diffusers' model is handed those tensors under its names through
our diffusers key table (`diffusers_unet_keys`, pure renames for SDXL), so both models hold identical
weights and neither pays for a random initialisation of its own. It then runs one step to warm up
and times --runs steps (batch 2 = batched classifier-free guidance) under torch.inference_mode.
The step includes the micro-conditioning embedding, which diffusers computes inside its forward.
The printed ratios are sdxl / diffusers of the median step times and of the peak RSS.

With --interleaved everything runs in this one process instead, every model on one shared copy of the
weights, one step of each per round in alternating order: each ratio comes from steps taken seconds
apart, which holds up where the machine's speed drifts between processes (no per-model peak RSS then).
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("sdxl", "diffusers", "sdxl-compiled", "diffusers-compiled")
PAIRS = [("sdxl", "diffusers"), ("sdxl-compiled", "diffusers"), ("sdxl-compiled", "diffusers-compiled"),
         ("diffusers-compiled", "diffusers")]  # the ratios printed, where both were measured


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


def inputs(batch: int, latent: int, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = float(latent * 8)
    return {
        "x": torch.randn(batch, config.in_channels, latent, latent, generator=g).to(dtype),
        "t": torch.full((batch,), 500.0),
        "context": torch.randn(batch, 77, config.context_dim, generator=g).to(dtype),
        "pooled": torch.randn(batch, config.adm_in_channels - 6 * config.addition_time_embed_dim, generator=g).to(dtype),
        "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch),
    }


def make_step(impl: str, config, batch: int, size: int, weights: dict[str, torch.Tensor] | None = None,
              dtype: torch.dtype = torch.float32):
    """(one U-Net step of `impl`, its weights in our names). With `weights` (our names) the model uses those tensors
    themselves (load_state_dict(assign=True)), so several models share one copy; else they are allocated and filled
    first (in float32, then converted to `dtype`: the same numbers, rounded, for both implementations)."""
    from sdxl.checkpoints.keymap import invert
    from sdxl.checkpoints.unet_keys import diffusers_unet_keys, unet_config_to_diffusers
    from sdxl.models.unet import UNet, micro_conditioning

    with torch.device("meta"):
        ours = UNet(config)
    if weights is None:
        weights = ours.to_empty(device="cpu").state_dict()
        fill_(weights)
        weights = {name: t.to(dtype) for name, t in weights.items()}
    if impl.startswith("sdxl"):
        model = ours
        model.load_state_dict(weights, assign=True)
    else:
        import diffusers

        with torch.device("meta"):
            model = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(config))
        # our names -> diffusers' (the SDXL table only renames: the same tensors)
        model.load_state_dict(invert(weights, diffusers_unet_keys(config)), assign=True)
    model.eval().requires_grad_(False)
    if impl.endswith("compiled"):
        from sdxl.acceleration import compile_unet

        compile_unet(model)  # the same call for both: fullgraph, static shapes, inductor's default mode on CPU

    d = inputs(batch, size // 8, config, dtype)
    if impl.startswith("sdxl"):
        def step():
            y = micro_conditioning(d["pooled"], d["time_ids"], dim=config.addition_time_embed_dim)
            return model(d["x"], d["t"], d["context"], y)
    else:
        cond = {"text_embeds": d["pooled"], "time_ids": d["time_ids"]}

        def step():
            return model(d["x"], d["t"], encoder_hidden_states=d["context"], added_cond_kwargs=cond).sample
    return step, weights


def child(args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file

    from sdxl.models import unet as unets

    config = unets.tiny if args.tiny else unets.base
    start = time.perf_counter()
    step, tensors = make_step(args.child, config, args.batch, args.size, dtype=DTYPES[args.dtype])
    built = time.perf_counter() - start
    rss_weights = memory_mib("VmRSS")

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


def interleaved(args: argparse.Namespace, impls: list[str]) -> None:
    """Every implementation in this process on one shared copy of the weights; each round times one step of each,
    in alternating order, so that a ratio comes from steps taken seconds apart."""
    import diffusers

    from sdxl.models import unet as unets

    config = unets.tiny if args.tiny else unets.base
    steps, weights = {}, None
    for impl in impls:
        steps[impl], weights = make_step(impl, config, args.batch, args.size, weights, DTYPES[args.dtype])
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    outputs = {}
    with torch.inference_mode():
        for impl in impls:  # warm-up (for the compiled ones: the compilation)
            t0 = time.perf_counter()
            outputs[impl] = steps[impl]()
            print(f"{impl:<18} warm-up step {time.perf_counter() - t0:.2f} s", flush=True)
        for r in range(args.runs):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                t0 = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - t0)
            print(f"round {r + 1}: " + ", ".join(f"{impl} {times[impl][-1]:.2f} s" for impl in impls), flush=True)
    print(f"\ntorch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} thread(s), {DTYPES[args.dtype]}, "
          f"{'tiny' if args.tiny else 'base'} U-Net, {args.size}x{args.size}, batch {args.batch}, one process, "
          f"steps interleaved; peak RSS of all together {memory_mib('VmHWM'):,.0f} MiB")
    for impl in impls:
        print(f"{impl:<18} median step {statistics.median(times[impl]):.3f} s over {args.runs} (min {min(times[impl]):.3f}, "
              f"max {max(times[impl]):.3f})")
    for impl, against in PAIRS:
        if impl in times and against in times:
            per_round = [a / b for a, b in zip(times[impl], times[against])]
            print(f"ratio {impl} / {against}: median of the {args.runs} rounds' ratios {statistics.median(per_round):.3f} "
                  f"(range {min(per_round):.3f}-{max(per_round):.3f}); ratio of medians "
                  f"{statistics.median(times[impl]) / statistics.median(times[against]):.3f}")
    if "diffusers" in outputs:
        for impl in impls:
            if impl != "diffusers":
                diff = (outputs[impl] - outputs["diffusers"]).abs().max().item()
                print(f"outputs: max |{impl} - diffusers| {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny U-Net config: a quick dry run")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights and activations (bf16: the AMX matrix units of recent Intel Xeons)")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    parser.add_argument("--compile", action="store_true",
                        help="also both U-Nets compiled by sdxl's compile_unet (the warm-up step is the compilation)")
    parser.add_argument("--impl", choices=IMPLS, action="append",
                        help="measure only this one (repeatable; default sdxl and diffusers, and with --compile the "
                             "compiled two)")
    parser.add_argument("--interleaved", action="store_true",
                        help="all in this one process, sharing one copy of the weights, steps alternating "
                             "(ratios immune to slow drifts of the machine's speed; no per-model peak RSS)")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    impls = args.impl or list(IMPLS if args.compile else IMPLS[:2])
    if args.interleaved:
        interleaved(args, impls)
        return

    import diffusers
    from safetensors.torch import load_file

    results: dict[str, list[dict]] = {}
    flags = [f"--size={args.size}", f"--batch={args.batch}", f"--runs={args.runs}", f"--dtype={args.dtype}"] + (["--tiny"] if args.tiny else [])
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for impl in impls:
                out = f"{tmp}/{impl}{r}.safetensors"
                proc = subprocess.run([sys.executable, __file__, "--child", impl, "--out", out, *flags],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{impl} process failed:\n{proc.stderr}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["output"] = load_file(out)["out"]
                results.setdefault(impl, []).append(res)
                print(f"round {r + 1} {impl:<18}: steps {', '.join(f'{s:.2f}' for s in res['times'])} s "
                      f"(warm-up {res['warmup']:.2f} s, weights built in {res['build']:.1f} s), "
                      f"RSS with weights {res['rss_weights_mib']:,.0f} MiB, peak {res['peak_rss_mib']:,.0f} MiB",
                      flush=True)

    first = next(iter(results.values()))[0]
    print(f"\ntorch {torch.__version__}, diffusers {diffusers.__version__}, {first['threads']} thread(s), {DTYPES[args.dtype]}, "
          f"{'tiny' if args.tiny else 'base'} U-Net ({first['weights_mib']:,.0f} MiB of weights), "
          f"{args.size}x{args.size} ({args.size // 8}x{args.size // 8} latents), batch {args.batch}")
    summary = {}
    for impl, rs in results.items():
        times = [s for r in rs for s in r["times"]]
        summary[impl] = (statistics.median(times), max(r["peak_rss_mib"] for r in rs))
        print(f"{impl:<18} median step {summary[impl][0]:.3f} s over {len(times)} steps in {len(rs)} processes "
              f"(min {min(times):.3f}, max {max(times):.3f}); peak RSS {summary[impl][1]:,.0f} MiB")
    reference = results.get("diffusers", [{}])[0].get("output")
    for impl, against in PAIRS:
        if impl in summary and against in summary:
            print(f"ratio {impl} / {against}: step time {summary[impl][0] / summary[against][0]:.3f}, "
                  f"peak RSS {summary[impl][1] / summary[against][1]:.3f}")
    for impl in results:
        if reference is not None and impl != "diffusers":
            diff = (results[impl][0]["output"] - reference).abs().max().item()
            print(f"outputs: max |{impl} - diffusers| {diff:.2e} (output std {reference.std().item():.3f})")

if __name__ == "__main__":
    main()
