"""Judge a trained shapes model: generate one 64x64 image per prompt, measure() it, report accuracies.

    python scripts/eval_builtin.py MODEL.safetensors [--n 48] [--steps 30] [--cfg 3] [--out DIR] [--refiner R]

Prompts: a seeded sample (seed 1234) of --n of the 8 x 7 x 3 = 168 (colour, background != colour, shape)
combinations ("a {colour} {shape} on a {background} background"); --n 168 takes them all. Image i uses seed i.
Prints and writes JSON: fraction where background, shape colour and shape all match, each of the three, and the
mean per-image pixel std (to be sure outputs are not blank).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def prompts(n: int) -> list[tuple[str, str, str]]:
    from sdxl.training.shapes import all_prompts

    combos = all_prompts()
    return combos if n >= len(combos) else random.Random(1234).sample(combos, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--refiner")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, help="default: the model's recommended scale (else 5)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", help="folder for the images and eval.json")
    args = p.parse_args(argv)

    import sdxl
    from sdxl.training.shapes import caption, judge, measure

    warnings.simplefilter("ignore")
    pipe = sdxl.load(args.model, refiner=args.refiner)
    cfg = args.cfg if args.cfg is not None else pipe.recommended_cfg()
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    keys = ("background", "colour", "shape")
    hits = {k: 0 for k in keys}
    all_ok, stds, rows = 0, [], []
    t0 = time.perf_counter()
    for i, (shape, colour, background) in enumerate(prompts(args.n)):
        text = caption(shape, colour, background)
        image = pipe.generate(text, width=args.size, height=args.size, steps=args.steps, cfg=cfg, seed=i,
                              **({} if args.refiner else {"refiner_switch": None}))[0]
        m = measure(image)
        ok = judge(image, shape, colour, background)
        del ok["all"]
        for k in keys:
            hits[k] += ok[k]
        all_ok += all(ok.values())
        std = float(np.asarray(image, dtype=np.float32).std())
        stds.append(std)
        rows.append({"prompt": text, "seed": i, "measured": [m["background"], m["colour"], m["shape"]], "ok": all(ok.values()), "std": std})
        if out:
            image.save(out / f"{i:03d}_{'ok' if all(ok.values()) else 'no'}_{text.replace(' ', '_')}.png")
    n = len(rows)
    result = {"model": args.model, "refiner": args.refiner, "n": n, "steps": args.steps, "cfg": cfg,
              "all": all_ok / n, **{k: hits[k] / n for k in keys}, "mean_image_std": float(np.mean(stds)),
              "min_image_std": float(np.min(stds)), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result))
    if out:
        (out / "eval.json").write_text(json.dumps({**result, "images": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
