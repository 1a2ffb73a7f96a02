"""Applying and removing LoRAs on the full-size SDXL base loaded from a file: time, memory held, exact restore, step cost.

    OMP_NUM_THREADS=2 python benchmarks/lora_apply.py [--dtype fp16] [--rank 32] [--latent 32] [--runs 3] [--dir /tmp]

The base U-Net and both text encoders are built at full size with random weights (no download) and written in
--dtype as an official-layout single file (`save_single_file`, about 7 GB in float16) in a temporary folder under
--dir, by a child process, so that the peak RSS printed is the measured process's own; the folder is deleted at the
end. The base is then loaded from that file (`load_single_file`, memory-mapped), so restoring reads the merged
tensors back from it. A rank-32 kohya LoRA on every transformer linear layer of the U-Net (attention q/k/v/out,
feed-forward, proj_in/out: the layers sd-scripts trains by default) and of both text encoders is written next to it;
three such LoRAs (different seeds) make the "three LoRAs" case. Printed:
- apply / restore seconds for one LoRA, the host memory kept to restore (`Applied.saved_bytes`), the process's peak
  RSS before applying (every weight read once, so the model is resident) and while applied, and whether every weight
  came back bit for bit (against a second load of the file); then the same again (the first apply also pays for
  copying each page of the mapped file it writes to: the merged weights need memory of their own);
- a guided U-Net call (batch 2, --latent x --latent latents) with three LoRAs merged against none,
  interleaved over --runs rounds: the ratio of medians (the target is <= 1.02).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl.adapters import apply, read_adapter
from sdxl.adapters.keys import KOHYA, stems
from sdxl.checkpoints.load import load_single_file
from sdxl.checkpoints.save import save_single_file
from sdxl.dtypes import torch_dtype
from sdxl.models import specs
from sdxl.models.specs import Components

TRANSFORMER_LAYERS = ("to_q", "to_k", "to_v", "to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out",
                      "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
MODELS = ("unet", "text_encoder", "text_encoder_2")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def full_size(dtype: torch.dtype) -> Components:
    """The official base's U-Net and text encoders with random weights, allocated straight in `dtype`."""
    parts = Components(kind="base")
    for name in MODELS:
        with torch.device("meta"):
            model = specs.MODEL_CLASSES[name](getattr(specs.BASE, name)).to(dtype)
        model = model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        setattr(parts, name, model.eval().requires_grad_(False))
    return parts


def write_base(path: Path, dtype: torch.dtype) -> None:
    save_single_file(full_size(dtype), path, dtype=dtype)


def write_lora(parts: Components, path: Path, rank: int, seed: int) -> int:
    """A kohya LoRA of every transformer linear layer; returns the modules it holds."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, (naming, target) in stems({n: m.config for n, m in parts.models().items()}).items():
        if naming is not KOHYA or not stem.endswith(TRANSFORMER_LAYERS):
            continue
        weight = getattr(parts, target.component).get_parameter(target.ours)
        shape = tuple(target.weight.save(weight)[target.index].shape)
        if len(shape) != 2:
            continue
        tensors[f"{stem}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).half()
        tensors[f"{stem}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return len(tensors) // 3


def weights(parts: Components):
    return ((f"{n}.{k}", v) for n, m in parts.models().items() for k, v in m.state_dict().items())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers (torch.equal on floats takes -0.0 for 0.0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def unet_call(parts: Components, latent: int, dtype: torch.dtype):
    c = parts.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(dtype)
    context = torch.randn(2, 77, c.context_dim, generator=g).to(dtype)
    y = torch.randn(2, c.adm_in_channels, generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            parts.unet(x, t, context, y)
        return time.perf_counter() - start

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--latent", type=int, default=32, help="latent side of the timed U-Net calls (32: 256 px)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoint folder is made")
    ap.add_argument("--write-base", type=Path, help=argparse.SUPPRESS)  # the child process's job
    args = ap.parse_args()
    dtype = torch_dtype(args.dtype)
    if args.write_base:
        write_base(args.write_base, dtype)
        return
    folder = Path(tempfile.mkdtemp(prefix="lora-apply-", dir=args.dir))
    try:
        run(args, dtype, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, dtype: torch.dtype, folder: Path) -> None:
    base = folder / "base.safetensors"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--write-base", str(base)], check=True)
    print(f"full-size base U-Net + text encoders written in {dtype}: {base.stat().st_size / 2**30:.2f} GiB "
          f"in {time.perf_counter() - start:.0f} s")
    parts = load_single_file(base, dtype=dtype)
    for i in range(3):
        modules = write_lora(parts, folder / f"lora{i}.safetensors", args.rank, seed=i)
    print(f"LoRA: rank {args.rank}, {modules} modules, {(folder / 'lora0.safetensors').stat().st_size / 2**20:.0f} MiB")
    adapters = [read_adapter(folder / f"lora{i}.safetensors", parts) for i in range(3)]
    for _, v in weights(parts):
        v.sum()  # every weight read once: the model resident, as after a first image
    rss0 = peak_rss_gib()
    start = time.perf_counter()
    applied = apply(parts, [(adapters[0], 0.8, 0.8)])
    t_apply = time.perf_counter() - start
    rss1 = peak_rss_gib()
    kept = applied.saved_bytes
    start = time.perf_counter()
    applied.restore()
    t_restore = time.perf_counter() - start
    fresh = dict(weights(load_single_file(base, dtype=dtype)))
    exact = all(torch.equal(bits(v), bits(fresh[k])) for k, v in weights(parts))
    del fresh
    print(f"apply {t_apply:.2f} s, restore {t_restore:.2f} s; kept to restore {kept / 2**30:.2f} GiB "
          f"({kept} bytes); peak RSS {rss0:.2f} -> {rss1:.2f} GiB while applied; restored bit for bit: {exact}")
    start = time.perf_counter()
    again = apply(parts, [(adapters[0], 0.8, 0.8)])
    t_apply = time.perf_counter() - start
    kept = again.saved_bytes
    start = time.perf_counter()
    again.restore()
    print(f"again: apply {t_apply:.2f} s, restore {time.perf_counter() - start:.2f} s, kept {kept} bytes "
          f"(the first apply also copied the mapped file's pages it wrote to)")

    call = unet_call(parts, args.latent, dtype)
    call()  # warm-up
    plain, merged = [], []
    for _ in range(args.runs):  # interleaved, so drift hits both alike
        plain.append(call())
        three = apply(parts, [(a, 0.7, 0.7) for a in adapters])
        merged.append(call())
        three.restore()
    ratio = statistics.median(merged) / statistics.median(plain)
    print(f"U-Net call ({args.latent}x{args.latent} latents, batch 2): none {statistics.median(plain):.2f} s, "
          f"three LoRAs {statistics.median(merged):.2f} s: {ratio:.3f}x")


if __name__ == "__main__":
    main()
