"""The training configuration: one TOML (or YAML) file, every field a `TrainConfig` attribute.

    cfg = load_config("configs/tiny.toml")   # ValueError naming the file and the field on any mistake

The TOML file is flat (`key = value` lines, no tables); see configs/*.toml for commented examples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import NAMES

# "dpo": Diffusion-DPO (Wallace et al. 2023) on preference pairs, with epsilon prediction (SDXL's); docs/dpo.md.
OBJECTIVES = ("epsilon", "v_prediction", "dpo")
PRECISIONS = ("no", "bf16", "fp16")
INITS = ("tiny", "tiny_refiner")
SAVE_DTYPES = NAMES  # sdxl.dtypes: fp16, bf16, fp32
PARALLEL = ("ddp", "fsdp")
# Linear layers of the U-Net's transformers that LoRA may wrap (suffixes of module names).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


@dataclass
class TrainConfig:
    # -- model
    # A checkpoint to fine-tune: an official-layout .safetensors file or a diffusers folder.
    model: str | None = None
    # Or build a model from scratch with random weights: "tiny" (base-shaped) or "tiny_refiner"
    # (tests, smoke runs). Exactly one of `model` / `init` must be given.
    init: str | None = None

    # -- data (sdxl.training.data.ImageCaptionDataset: images with same-named .txt captions)
    # the image folder; objective = "dpo": the preference pairs (sdxl.training.pairs: a folder with pairs.jsonl, or
    # Pick-a-Pic parquet files)
    data: str = ""
    resolution: int = 1024  # target area is resolution^2; aspect-ratio buckets keep about that many pixels
    bucket_multiple: int = 64  # bucket sides are multiples of this (>= 8: the VAE downscales by 8)
    random_crop: bool = False  # random instead of centre crops; the crop goes into micro-conditioning
    caption_dropout: float = 0.0  # fraction of empty captions: teaches the unconditional branch for CFG
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    # Every image is decoded when the folder is scanned, before the models load. An unreadable one (truncated,
    # corrupt, not an image) stops the run there, naming the files; true: leave them out with a warning (their
    # count and names go into output_dir/log.txt). Dropping training data should be a decision, not a surprise.
    skip_unreadable_images: bool = False
    # Images with neither a sidecar .txt nor a metadata.jsonl caption are an error; true: train them with the
    # empty caption (with a warning).
    allow_missing_captions: bool = False

    # -- optimisation
    batch_size: int = 1  # images per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step: effective batch = batch_size * grad_accum * world
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this number)
    lr: float = 1e-5  # AdamW peak learning rate (LoRA usually wants ~1e-4)
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup: int = 0  # steps of linear warm-up from 0 to lr; constant afterwards
    max_grad_norm: float = 1.0  # gradient clipping (0: off); keeps early fine-tuning steps from blowing up
    seed: int = 0  # model init (init=...), noise, timesteps, data order: the same seed gives the same run

    # -- diffusion objective
    # what the U-Net predicts: "epsilon" (SDXL) or "v_prediction"; or "dpo": preference tuning on pairs
    # (prompt, preferred image, rejected image) with epsilon prediction, as SDXL 1.0 was tuned from 0.9
    objective: str = "epsilon"
    # Diffusion-DPO's beta (KL strength; larger keeps the model nearer the reference): 5000, the paper's and its
    # code's value for SDXL (SalesforceAIResearch/DiffusionDPO launchers/sdxl.sh, --beta_dpo 5000). dpo only.
    dpo_beta: float = 5000.0
    offset_noise: float = 0.0  # per-channel constant noise added to eps (~0.05): lets models learn very dark/bright images
    # Min-SNR-gamma loss weighting (Hang et al. 2023, gamma ~5): faster convergence; None = plain MSE.
    min_snr_gamma: float | None = None
    # Training timesteps are drawn uniformly from [timestep_min, timestep_max] (of 0..999). The
    # refiner was trained on the low-noise end only (t < 200): use timestep_max = 199 for it.
    timestep_min: int = 0
    timestep_max: int = 999
    # The refiner's U-Net is conditioned on an aesthetic score; our data has none, so one constant
    # (6.0 is what generation uses for the positive prompt) is given to every image.
    aesthetic_score: float = 6.0

    # -- what is trained
    train_text_encoders: bool = False  # also fine-tune both CLIP encoders (full fine-tunes only)
    lora_rank: int = 0  # 0: full fine-tune of the U-Net; > 0: train only LoRA adapters of this rank
    lora_alpha: float | None = None  # LoRA scale = alpha / rank; None: alpha = rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    ema_decay: float | None = None  # keep an exponential moving average of the trained weights (~0.9999)

    # -- speed and memory
    mixed_precision: str = "no"  # "bf16" / "fp16": torch.autocast for the forward pass (weights stay fp32)
    gradient_checkpointing: bool = False  # recompute U-Net blocks in the backward pass: less memory, ~30% slower
    cache_text: bool = False  # encode each distinct caption once (kept in memory, saved to output/cache)
    # encode each (image, crop, flip) once: the VAE posterior's mean and std are kept in memory (float16) and saved
    # to output_dir/cache/latents.safetensors; every step still draws a fresh posterior sample from them
    cache_latents: bool = False
    # Several processes (torchrun): "ddp" keeps a whole copy of the weights and optimizer state in each process and
    # averages gradients; "fsdp" (PyTorch FSDP2, full fine-tunes) splits weights, gradients and optimizer state
    # across the processes and gathers each U-Net block / CLIP layer only while it runs: for models that do not fit.
    parallel: str = "ddp"

    # -- outputs
    output_dir: str = "runs/train"  # checkpoints/, loss.csv, loss.png, config.toml
    save_every: int = 0  # save a checkpoint every N steps (0: only at the end)
    save_dtype: str = "fp16"  # dtype of the model / LoRA files (the training state is always exact)
    resume: str | None = None  # a checkpoint folder to continue from, or "latest" (output_dir's newest)
    # A fresh run (no resume) refuses an output_dir that is not empty, so that it never overwrites an earlier run's
    # checkpoints and log; true (or --overwrite): delete that run's files first (other files stay). The run's
    # config.toml records false, so that re-running the record never deletes a run.
    overwrite: bool = False
    log_every: int = 10  # steps between loss.csv rows / progress-bar updates

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def dpo(self) -> bool:
        return self.objective == "dpo"

    def to_toml(self) -> str:
        """The config as TOML text (None fields are left out: None is their default)."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# ---------------------------------------------------------------------------------------------
# Validation.


def _check_type(name: str, value: Any, kind: str) -> None:
    """kind: 'int', 'float', 'bool', 'str', 'list[str]'; '?' suffix allows None."""
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise ValueError(f"{name} must be {'a finite number' if kind == 'float' else 'a ' + kind}, got {value!r}")


def _kind(annotation: str) -> str:
    a = annotation.replace(" ", "")
    optional = a.endswith("|None")
    a = a.removesuffix("|None")
    return a + ("?" if optional else "")


def check_types(c: Any) -> None:
    """Every field of a config dataclass of the type its annotation says (one-line ValueError)."""
    for f in dataclasses.fields(c):
        _check_type(f.name, getattr(c, f.name), _kind(str(f.type)))


def choose_value(c: Any, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(c, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(c, name)!r}")


def at_least_value(c: Any, name: str, low: float) -> None:
    if getattr(c, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(c, name)!r}")


def _validate(c: TrainConfig) -> None:
    check_types(c)
    choose, at_least = functools.partial(choose_value, c), functools.partial(at_least_value, c)

    if (c.model is None) == (c.init is None):
        raise ValueError("give exactly one of `model` (a checkpoint to fine-tune) or `init` (build 'tiny' from scratch)")
    if c.init is not None:
        choose("init", INITS)
    choose("objective", OBJECTIVES)
    if not c.data:
        raise ValueError("data must name the preference pairs (a folder with pairs.jsonl, or parquet files)" if c.dpo
                         else "data must name the image folder to train on")
    choose("mixed_precision", PRECISIONS)
    choose("save_dtype", SAVE_DTYPES)
    choose("parallel", PARALLEL)
    if c.parallel == "fsdp" and c.lora:
        raise ValueError("parallel = \"fsdp\" is for full fine-tunes; LoRA's adapters are small: use \"ddp\"")
    for name in ("resolution", "batch_size", "grad_accum", "steps", "log_every"):
        at_least(name, 1)
    for name in ("num_workers", "warmup", "save_every", "lora_rank", "seed", "offset_noise", "weight_decay",
                 "max_grad_norm"):
        at_least(name, 0)
    if c.bucket_multiple < 8 or c.bucket_multiple % 8:
        raise ValueError(f"bucket_multiple must be a multiple of 8 (the VAE's downscaling), got {c.bucket_multiple}")
    if c.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8 pixels, got {c.resolution}")
    if not 0.0 <= c.caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {c.caption_dropout}")
    if not c.lr > 0:
        raise ValueError(f"lr must be > 0, got {c.lr}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    if c.min_snr_gamma is not None and c.min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 (or left out for plain MSE), got {c.min_snr_gamma}")
    if not 0 <= c.timestep_min <= c.timestep_max <= 999:
        raise ValueError(f"need 0 <= timestep_min <= timestep_max <= 999, got {c.timestep_min} and {c.timestep_max}")
    if c.ema_decay is not None and not 0.0 < c.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.9999), got {c.ema_decay}")
    if c.lora_alpha is not None and c.lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {c.lora_alpha}")
    unknown = [t for t in c.lora_targets if t not in LORA_TARGETS]
    if unknown or (c.lora and not c.lora_targets):
        raise ValueError(f"lora_targets: {unknown or 'empty'}; choose from {', '.join(LORA_TARGETS)}")
    if c.lora and c.train_text_encoders:
        raise ValueError("train_text_encoders is for full fine-tunes; LoRA trains U-Net adapters only")
    if c.overwrite and c.resume:
        raise ValueError("resume continues the run in output_dir and overwrite deletes it: give one of them")
    if c.cache_text and c.train_text_encoders:
        raise ValueError("cache_text needs frozen text encoders (train_text_encoders = false)")
    if c.dpo:
        _validate_dpo(c)


def _validate_dpo(c: TrainConfig) -> None:
    """What does not combine with objective = "dpo" (one line each)."""
    if not c.dpo_beta > 0:
        raise ValueError(f"dpo_beta must be > 0 (the paper's SDXL value is 5000), got {c.dpo_beta}")
    if c.min_snr_gamma is not None:
        raise ValueError("min_snr_gamma does not combine with objective = \"dpo\" (Diffusion-DPO weights all "
                         "timesteps alike): leave it out")
    if c.train_text_encoders:
        raise ValueError("train_text_encoders does not combine with objective = \"dpo\" (its reference would need "
                         "frozen copies of both text encoders): the U-Net trains alone")
    if c.parallel == "fsdp":
        raise ValueError("parallel = \"fsdp\" does not combine with objective = \"dpo\" (the frozen reference "
                         "U-Net would not be sharded): use \"ddp\", or LoRA")


# ---------------------------------------------------------------------------------------------
# Loading.


def config_from_dict(values: dict[str, Any], where: str = "config", cls: type = TrainConfig) -> Any:
    """A TrainConfig (or another config dataclass, `cls`) from a dict (parsed TOML); ValueError naming `where` and
    the bad field."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1)) else k for k in unknown]
        raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}")
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a training config, TOML (or YAML: .yaml / .yml, needs PyYAML); `overrides` replace fields (e.g. from
    the command line)."""
    path = Path(path)
    values = read_config_values(path)
    values.update(overrides)
    return config_from_dict(values, where=str(path))


def read_config_values(path: Path) -> dict[str, Any]:
    """The `key = value` pairs of a flat TOML (or YAML) config file; ValueError naming the file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such config file" if not path.exists() else f"{path}: not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # (a byte-order mark, as some editors write, is allowed)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}); "
                         "save the config as UTF-8") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the config as TOML") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected `key: value` lines, got a YAML {type(values).__name__}")
    else:
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    tables = [k for k, v in values.items() if isinstance(v, dict)]
    if tables:
        raise ValueError(f"{path}: unexpected table(s) [{'], ['.join(tables)}]; the config is flat `key = value` lines")
    return values
