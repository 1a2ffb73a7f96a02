"""AUTOMATIC1111's vocabulary: sampler and schedule names, infotext labels, and the infotext text format.

The one table that the command line, the HTTP server (A1111's `/sdapi/v1/*` and `/png-info`) and the web UI
share, so that all of them write and read the words AUTOMATIC1111 1.10 (and Forge, Fooocus, civitai, image
browsers) use. Plain data and plain functions; nothing here imports torch (the server and `--help` start fast).

    to_a1111("dpmpp_2m", "karras")                    -> ("DPM++ 2M", "Karras")
    from_a1111("DPM++ 2M Karras")                     -> ("dpmpp_2m", "karras")   (A1111 < 1.9's combined names)
    from_a1111("Euler a", "Automatic")                -> ("euler_ancestral", "default")
    parse_infotext(text).fields["CFG scale"]          -> "7"

Names here are read from AUTOMATIC1111's modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py,
sd_samplers_lcm.py, sd_schedulers.py and processing.py (create_infotext) for their behaviour; no code is taken.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class SamplerName(NamedTuple):
    label: str  # what AUTOMATIC1111 1.10 writes after "Sampler:" (and lists in its UI); ours where it has none
    automatic: str = "default"  # our schedule for A1111's "Automatic": the schedule A1111 runs this sampler on
    aliases: tuple[str, ...] = ()  # also read: A1111's API aliases, Forge's and Fooocus' ids, diffusers' classes
    note: str = ""  # when to use it (`sdxl samplers`)


class ScheduleName(NamedTuple):
    label: str  # what AUTOMATIC1111 1.10 writes after "Schedule type:" (ours where A1111 has no equivalent)
    aliases: tuple[str, ...] = ()
    note: str = ""


# Our sampler id -> A1111's name. Our ids are ComfyUI's, and are always read too. Adding a sampler is adding a row.
# A1111's "Automatic" schedule is the one its sd_samplers_kdiffusion.py table gives the sampler ('scheduler').
# A diffusers class name stands for that scheduler's default configuration (DPMSolverMultistepScheduler: 2M).
SAMPLERS: dict[str, SamplerName] = {
    "euler": SamplerName("Euler", aliases=("k_euler", "EulerDiscreteScheduler"),
                         note="first-order ODE solver, deterministic: the safe default (SDXL's own scheduler)"),
    "euler_cfg_pp": SamplerName("Euler CFG++", note="Euler with CFG++ guidance (Chung et al. 2024): use cfg 0.5-1"),
    "euler_ancestral": SamplerName("Euler a", aliases=("k_euler_a", "k_euler_ancestral", "Euler Ancestral",
                                                        "EulerAncestralDiscreteScheduler"),
                                   note="Euler with fresh noise each step: varied, soft; does not converge with steps"),
    "euler_ancestral_cfg_pp": SamplerName("Euler a CFG++", note="Euler a with CFG++ guidance: use cfg 0.5-1"),
    "heun": SamplerName("Heun", aliases=("k_heun", "HeunDiscreteScheduler"),
                        note="second-order, 2 U-Net calls a step: accurate, twice the time"),
    "dpm_2": SamplerName("DPM2", aliases=("k_dpm_2", "KDPM2DiscreteScheduler"),
                         note="DPM-Solver-2, 2 U-Net calls a step (Karras et al.'s schedule by default)"),
    "dpm_2_ancestral": SamplerName("DPM2 a", aliases=("k_dpm_2_a", "KDPM2AncestralDiscreteScheduler"),
                                   note="DPM2 with fresh noise each step"),
    "lms": SamplerName("LMS", aliases=("k_lms", "LMSDiscreteScheduler"),
                       note="linear multistep, order 4: fast convergence on smooth schedules"),
    "dpmpp_2s_ancestral": SamplerName("DPM++ 2S a", aliases=("k_dpmpp_2s_a", "k_dpmpp_2s_ancestral"),
                                      note="DPM-Solver++(2S) with noise, 2 U-Net calls a step"),
    # A1111 1.9+ runs DPM++ 2M and DPM++ SDE on Karras sigmas, and the SDE multistep ones on exponential sigmas.
    "dpmpp_sde": SamplerName("DPM++ SDE", "karras", ("k_dpmpp_sde", "dpmpp_sde_gpu", "DPMSolverSDEScheduler"),
                             note="DPM-Solver++ SDE, 2 U-Net calls a step: detailed at few steps (8-15)"),
    "dpmpp_2m": SamplerName("DPM++ 2M", "karras", ("k_dpmpp_2m", "DPMSolverMultistepScheduler"),
                            note="DPM-Solver++(2M), multistep: sharp and quick, 20-30 steps; best with Karras"),
    # A1111's DPM++ 2M SDE is the midpoint variant, as ours (diffusers' default solver_type); "_gpu" is
    # ComfyUI's / Fooocus' same sampler with its Brownian noise drawn on the GPU.
    "dpmpp_2m_sde": SamplerName("DPM++ 2M SDE", "exponential", ("k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
                                note="DPM-Solver++(2M) SDE (midpoint): more detail than 2M, needs 25+ steps"),
    "dpmpp_2m_sde_heun": SamplerName("DPM++ 2M SDE Heun", "exponential", ("k_dpmpp_2m_sde_heun",
                                                                          "dpmpp_2m_sde_heun_gpu"),
                                     note="DPM-Solver++(2M) SDE with the Heun solver type"),
    "dpmpp_3m_sde": SamplerName("DPM++ 3M SDE", "exponential", ("k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"),
                                note="third-order multistep SDE: best at 30+ steps"),
    "ddim": SamplerName("DDIM", aliases=("DDIMScheduler",), note="DDIM (Song et al. 2020), eta 0, deterministic"),
    "lcm": SamplerName("LCM", aliases=("k_lcm", "LCMScheduler"),
                       note="for LCM-distilled models and LoRAs: 4-8 steps, cfg 1-2"),
    "tcd": SamplerName("TCD", aliases=("TCDScheduler",), note="for TCD-distilled models and LoRAs: 4-8 steps"),
    "ipndm": SamplerName("IPNDM", note="improved pseudo linear multistep, order 4, deterministic"),
    "deis": SamplerName("DEIS", aliases=("DEISMultistepScheduler",), note="DEIS multistep, order 3: good at 10-20 steps"),
    "uni_pc": SamplerName("UniPC", aliases=("unipc", "UniPCMultistepScheduler"),
                          note="UniPC (bh1), order 3: good at 10-20 steps"),
    "uni_pc_bh2": SamplerName("UniPC bh2", note="UniPC with the bh2 variant: for guided runs at very few steps"),
    "restart": SamplerName("Restart", "karras", note="Euler steps with restarts of added noise: detail at 20+ steps"),
}

# Our schedule id -> A1111's name.
# "default" is the model's own scheduler config: for SDXL, diffusers' EulerDiscrete "leading" spacing
# (t = 958, 925, ..., 1 for 30 steps). A1111 has no label with these sigmas: its "Automatic" is Karras for
# DPM++ 2M (so a re-run in A1111 would differ), its "Uniform" runs t = 999 .. 0, and its "DDIM" schedule equals
# "leading" only when the steps divide 1000. So we keep our own word, "Default".
# "trailing" (diffusers' trailing spacing, t = round(1000 - i * 1000 / n) - 1) is not A1111's "Simple" (which
# floors instead of rounding) nor "SGM Uniform" (steps of 999 / n): our own word again, "Trailing".
# The others are A1111's (and ComfyUI's) schedules of the same names and formulas.
SCHEDULES: dict[str, ScheduleName] = {
    "default": ScheduleName("Default", note="the model's own scheduler config (SDXL: diffusers' leading spacing)"),
    "trailing": ScheduleName("Trailing", note="diffusers' trailing spacing: starts at the last timestep"),
    "karras": ScheduleName("Karras", note="Karras et al. 2022 (rho 7): more steps at low noise; DPM++'s favourite"),
    "exponential": ScheduleName("Exponential", note="log-linear sigmas: for the SDE samplers"),
    "sgm_uniform": ScheduleName("SGM Uniform", ("SGMUniform",), note="uniform timesteps from the top: Lightning/Turbo"),
    "simple": ScheduleName("Simple", note="ComfyUI's simple: evenly spaced training sigmas"),
    "ddim_uniform": ScheduleName("DDIM", ("ddim uniform",), note="DDIM's uniform timesteps"),
    "normal": ScheduleName("Normal", note="ComfyUI's normal: uniform in timesteps"),
    "beta": ScheduleName("Beta", note="ComfyUI's beta (alpha = beta = 0.6): more steps at both ends"),
    "polyexponential": ScheduleName("Polyexponential", note="k-diffusion's polyexponential, rho 1"),
    "kl_optimal": ScheduleName("KL Optimal", note="the KL-optimal schedule (Sabour et al. 2024)"),
    "align_your_steps": ScheduleName("Align Your Steps", ("AYS",), note="NVIDIA's optimised SDXL sigmas: 10-20 steps"),
}

# How (word:1.2) weights apply: our ids -> A1111's "Emphasis" values (written only when not its default).
# "comfy" is ComfyUI's reading, which A1111 does not have.
EMPHASIS = {"original": "Original", "no_norm": "No norm", "none": "None", "comfy": "Comfy"}

# A1111's "the sampler's own schedule" (its default since 1.9). Read as SamplerName.automatic; never written.
AUTOMATIC = "Automatic"

# Infotext labels, in the order A1111 1.10 writes them, for our settings. "CFG rescale", "Refiner" and
# "Refiner switch at" are where A1111's extra parameters (its refiner, the CFG-rescale extension) put them.
LABELS: dict[str, str] = {
    "negative_prompt": "Negative prompt",
    "steps": "Steps",
    "sampler": "Sampler",
    "schedule": "Schedule type",
    "cfg": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model_hash": "Model hash",
    "model": "Model",
    "vae_hash": "VAE hash",
    "vae": "VAE",
    "strength": "Denoising strength",
    "hires_resize": "Hires resize",
    "hires_steps": "Hires steps",
    "hires_upscaler": "Hires upscaler",
    "inpaint_fill": "Masked content",
    "clip_skip": "Clip skip",
    "guidance_rescale": "CFG rescale",
    "emphasis": "Emphasis",
    "lora_hashes": "Lora hashes",
    "refiner": "Refiner",
    "refiner_switch": "Refiner switch at",
    "version": "Version",
}


class UnknownName(ValueError):
    """A sampler or schedule name that is none of ours (nor A1111's, ComfyUI's or Fooocus' word for one)."""

    def __init__(self, kind: str, name: str):
        table = SAMPLERS if kind == "sampler" else SCHEDULES
        ours = ", ".join(f"{row.label} ({key})" for key, row in table.items())
        super().__init__(f"unknown {kind} {name!r}; sdxl has {ours}")
        self.kind, self.name = kind, name


def _key(name: str) -> str:
    return " ".join(str(name).split()).lower()


def _index(table: dict) -> dict[str, str]:
    index = {}
    for ours, row in table.items():
        for name in (ours, row.label, *row.aliases):
            index[_key(name)] = ours
    return index


_SAMPLER_INDEX = _index(SAMPLERS)
_SCHEDULE_INDEX = _index(SCHEDULES)


def to_a1111(sampler: str, schedule: str) -> tuple[str, str]:
    """(A1111's "Sampler", its "Schedule type") for our ids; ids without a row are written as they are."""
    return (SAMPLERS[sampler].label if sampler in SAMPLERS else sampler,
            SCHEDULES[schedule].label if schedule in SCHEDULES else schedule)


def sampler_id(name: str) -> str:
    """Our sampler id for any name we read (our id, A1111's label or alias, ComfyUI's id). UnknownName otherwise."""
    try:
        return _SAMPLER_INDEX[_key(name)]
    except KeyError:
        raise UnknownName("sampler", name) from None


def schedule_id(name: str, sampler: str | None = None) -> str:
    """Our schedule id for a name we read; A1111's "Automatic" is the schedule A1111 runs `sampler` on."""
    if _key(name) == _key(AUTOMATIC):
        return SAMPLERS[sampler].automatic if sampler in SAMPLERS else "default"
    try:
        return _SCHEDULE_INDEX[_key(name)]
    except KeyError:
        raise UnknownName("schedule", name) from None


def split_schedule(name: str) -> tuple[str, str | None]:
    """A1111 < 1.9's combined names ("DPM++ 2M Karras") -> ("DPM++ 2M", "karras"); others -> (name, None)."""
    words = " ".join(str(name).split())
    for suffix in sorted(_SCHEDULE_INDEX, key=len, reverse=True):
        if words.lower().endswith(" " + suffix):
            return words[: -len(suffix)].strip(), _SCHEDULE_INDEX[suffix]
    return words, None


def sampler_from_a1111(name: str) -> str:
    """Our sampler for A1111's "Sampler" (a combined "DPM++ 2M Karras" too). UnknownName names the whole name."""
    try:
        return sampler_id(split_schedule(name)[0])
    except UnknownName:
        raise UnknownName("sampler", name) from None


def schedule_from_a1111(sampler: str, schedule_type: str | None = None) -> str:
    """Our schedule for A1111's "Sampler" and optional "Schedule type" (or Fooocus' "Scheduler").

    A schedule in the sampler's name wins over "Schedule type", as in A1111. Without either it is "default":
    before 1.9 A1111 ran a sampler named alone on the model's own sigmas. "Automatic" with a sampler we do not
    know is "default" too."""
    base, combined = split_schedule(sampler)
    if combined is not None:
        return combined
    if not schedule_type:
        return "default"
    try:
        ours = sampler_id(base)
    except UnknownName:
        ours = None
    return schedule_id(schedule_type, ours)


def from_a1111(sampler: str, schedule_type: str | None = None) -> tuple[str, str]:
    """(our sampler, our schedule) from A1111's "Sampler" and optional "Schedule type"; UnknownName otherwise."""
    return sampler_from_a1111(sampler), schedule_from_a1111(sampler, schedule_type)


# -- A1111 1.10's clip skip: it counts layers from the end (1 = the last), and SDXL uses the penultimate layer
# whatever it says (its CLIP-skip setting changes SDXL only with the sdxl_clip_l_skip option, where 2 is the
# penultimate). So "Clip skip: 2" (or 1, or none) is SDXL's default, our clip_skip 0; each further step is ours + 1.


def clip_skip_to_a1111(clip_skip: int | None) -> int | None:
    return clip_skip + 2 if clip_skip else None  # 0: SDXL's default, which A1111 leaves out of its infotext


def clip_skip_from_a1111(value: int) -> int | None:
    return value - 2 if value > 2 else None


# -- the text format: prompt lines, "Negative prompt: ..." lines, then one line of "Label: value" pairs


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a ',', ':' or newline (which would end or split it)."""
    text = str(value)
    if any(c in text for c in ",:\n") or text[:1] in ('"', "{", "["):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative_prompt: str, fields: list[tuple[str, Any]]) -> str:
    """The "parameters" text: the prompt, "Negative prompt: ..." when there is one, and the fields that are not None."""
    pairs = ", ".join(f"{label}: {quote(value)}" for label, value in fields if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


@dataclass
class Infotext:
    prompt: str = ""
    negative_prompt: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # label -> value (text; JSON values such as Hashes decoded)


MIN_FIELDS = 3  # a last line with fewer "Label: value" pairs is part of the prompt (as A1111 reads it)


def parse_infotext(text: str) -> Infotext:
    """Prompt, negative prompt and the "Label: value" fields of A1111's "parameters" text (quoted values unquoted)."""
    *lines, last = str(text).strip().split("\n")
    fields = parse_fields(last)
    if len(fields) < MIN_FIELDS:
        lines, fields = [*lines, last], {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt), "\n".join(negative), fields)


_DECODER = json.JSONDecoder()


def parse_fields(line: str) -> dict[str, Any]:
    """`Steps: 20, Sampler: "a, b", Hashes: {...}` -> {"Steps": "20", "Sampler": "a, b", "Hashes": {...}}.

    A value that starts with a quote, brace or bracket is read as JSON (A1111 quotes values holding ',' or ':';
    civitai writes its Hashes as a JSON object); a segment without a colon is a bare flag (A1111 writes `k` for
    `k: k`). Nothing is evaluated."""
    fields: dict[str, Any] = {}
    pos, end = 0, len(line)
    while pos < end:
        colon, comma = line.find(":", pos), line.find(",", pos)
        if colon < 0 or 0 <= comma < colon:
            stop = end if comma < 0 else comma
            if line[pos:stop].strip():
                fields[line[pos:stop].strip()] = line[pos:stop].strip()
            pos = stop + 1
            continue
        key, pos = line[pos:colon].strip(), colon + 1
        while pos < end and line[pos] == " ":
            pos += 1
        value, pos = _value(line, pos)
        fields[key] = value
    return fields


def _value(line: str, pos: int) -> tuple[Any, int]:
    """The value starting at `pos` and the position after its comma."""
    if line[pos:pos + 1] in ('"', "{", "["):
        try:
            value, stop = _DECODER.raw_decode(line, pos)
        except json.JSONDecodeError:
            pass
        else:
            comma = line.find(",", stop)
            comma = len(line) if comma < 0 else comma
            if not line[stop:comma].strip():  # else not JSON after all: read it as plain text
                return value, comma + 1
    comma = line.find(",", pos)
    comma = len(line) if comma < 0 else comma
    return line[pos:comma].strip(), comma + 1
