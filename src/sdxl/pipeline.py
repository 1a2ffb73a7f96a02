"""Generation with SDXL: text-to-image, image-to-image, inpainting, outpainting, base -> refiner.

    pipe = sdxl.load("sd_xl_base_1.0.safetensors", refiner="sd_xl_refiner_1.0.safetensors", device="cuda", dtype="fp16")
    images = pipe.generate("a lighthouse at dusk", steps=30, cfg=5.0, seed=1, batch=2)

Every mode runs the same steps (`Pipeline.run`):

1. prompts -> conditioning (`sdxl.conditioning`): the penultimate hidden states of CLIP ViT-L
   (`prompt`) and OpenCLIP bigG (`prompt_2`, default `prompt`) concatenated (B, 77, 2048), and
   y = bigG's pooled output + embeddings of the micro-conditioning numbers; the negative prompt's
   the same way, or zeros where the model asks for that.
2. starting latents (`sdxl.latents`): per image i, a CPU generator seeded with `seed + i`, consumed
   in diffusers' order; so a seed gives the same image on any device, and image i of a batch is
   the single image of seed + i.
3. `sdxl.sampling.sample` runs the sampler; the model function (`guided_unet`) does classifier-free
   guidance (and guidance rescale) on the U-Net's eps / v prediction. Inpainting with an ordinary
   4-channel U-Net blends, after each step, the kept region back from the init latents noised to
   the next noise level; a 9-channel inpainting U-Net gets the mask and the masked image's latents
   as extra input channels instead.
4. base -> refiner: the base stops at `refiner_switch` of the schedule and the refiner finishes
   from its latents, not decoded in between.
5. decoding (`sdxl.latents`): in the VAE's dtype; an image that comes out non-finite (the official
   VAE overflows in float16) is decoded again in float32, with a warning.

What a call can set is `sdxl.options.GenerationOptions`. Micro-conditioning sizes are (height, width)
and the crop is (top, left), as in the SDXL paper and diffusers. Differences from diffusers, on
purpose: an empty negative prompt ("") counts as no negative prompt (diffusers zeroes only for
None); `clip_skip` applies to the negative prompt too; the refiner's bigG encoder reads `prompt_2`
(diffusers gives it `prompt`); negative micro-conditioning values default to the positive ones
wherever they are not given; image i of a batch never depends on the batch size (diffusers'
inpainting encodes a shared init image with the first generator only); bigG reads "!" as the
punctuation it is (as OpenCLIP, sgm, AUTOMATIC1111 and ComfyUI do), where diffusers' tokenizer_2 turns
it into its pad token; prompts are read in AUTOMATIC1111's syntax (`sdxl.prompts`), so brackets weigh
words unless `emphasis="none"`, and prompts longer than 75 tokens are encoded in chunks, not cut.

LoRAs (`loras=`, `<lora:NAME:W>` in prompts) are merged into the base's weights before the run and
stay merged until a call asks for another set, which first restores the base weights exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import images as imaging
from . import sampling
from .acceleration import (
    BF16_WORTH,
    QUANTISED,
    Offload,
    check_modes,
    compile_unet,
    cpu_bf16_speedup,
    execution_device,
    store_quantised,
)
from .adapters.library import EMBEDDING_SUFFIXES, LORA_SUFFIXES, Active, Embeddings, Library
from .checkpoints import resident
from .checkpoints.paths import resolve_path
from .conditioning import Conditioning, PromptCache, Schedule, scheduled_conditioning
from .latents import Inpaint, PrecisionWarning, decode_latents, encode_image, initial_noise, inpaint_start
from .models.specs import Components
from .options import (
    DEFAULT_CFG,
    LATENT_UPSCALERS,
    MAX_PIXELS,
    SDXL_RESOLUTIONS,
    GenerationOptions,
    ResolutionWarning,
    check_pixels,
    warn_if_untrained_size,
)
from .prompts import extract_networks
from .sampling import Cancelled

__all__ = [
    "SDXL_RESOLUTIONS",
    "Cancelled",
    "GenerationOptions",
    "Pipeline",
    "PrecisionWarning",
    "ResolutionWarning",
    "decode_latents",
    "encode_image",
    "load",
    "upscale_latents",
]


def _param(module: torch.nn.Module) -> Tensor:
    return next(module.parameters())


def rescale_guidance(guided: Tensor, cond: Tensor, amount: float) -> Tensor:
    """Guidance rescale: match the guided prediction's per-image std to the conditional one's, mixed by `amount`."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return amount * rescaled + (1 - amount) * guided


class _Calls:
    """The U-Net calls of one run, counted from 0: AUTOMATIC1111's clock for prompt editing."""

    def __init__(self):
        self.n = 0


def _at(schedule: Schedule, call: int) -> Conditioning:
    """The conditioning for U-Net call `call` (the last one's past the schedule's end)."""
    for last, cond in schedule:
        if call <= last:
            return cond
    return schedule[-1][1]


def guided_unet(unet: torch.nn.Module, cond: Conditioning | Schedule, cfg: float, rescale: float,
                extra: Tensor | None = None, *, uncond: bool = False,
                calls: _Calls | None = None) -> Callable[[Tensor, Tensor], Tensor | tuple]:
    """The model function the samplers' denoiser calls: the U-Net with classifier-free guidance (and
    guidance rescale) on its eps / v prediction; `extra` are input channels appended to x (inpainting U-Nets).

    cond: one conditioning, or a schedule of them (prompt editing), chosen by the count of calls in `calls`.
    uncond: return (guided, unconditional) predictions, the pair the CFG++ samplers need (`sampling.Denoiser`
    turns it into (denoised, uncond_denoised)); without a negative branch (cond.guided False) the conditional
    prediction is both."""
    schedule = [(0, cond)] if isinstance(cond, Conditioning) else cond
    guided = schedule[0][1].guided
    calls = calls or _Calls()
    dtype = _param(unet).dtype
    if extra is not None:
        extra = (torch.cat([extra, extra]) if guided else extra).to(dtype)

    def model_fn(x_in: Tensor, t: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        c = schedule[0][1] if len(schedule) == 1 else _at(schedule, calls.n)  # Python ints: no device reads
        calls.n += 1
        h = x_in.to(dtype)
        if guided:
            h = torch.cat([h, h])
        if extra is not None:
            h = torch.cat([h, extra], dim=1)
        out = unet(h, t, c.context, c.y)
        negative = out
        if guided:
            negative, text = out.chunk(2)
            out = negative + cfg * (text - negative)
            if rescale > 0:
                out = rescale_guidance(out, text, rescale)
        return (out.float(), negative.float()) if uncond else out.float()

    return model_fn


class _Progress:
    """Counts steps over all stages (and both passes of a hires fix) for the user's callbacks."""

    def __init__(self, callback, total: int, preview=None):
        self.callback, self.preview, self.total, self.done = callback, preview, total, 0

    def step(self, latents: Tensor, denoised: Tensor) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total, latents)
        if self.preview is not None:
            self.preview(self.done, self.total, denoised)


class _Interrupted(Cancelled):
    """`interrupt()` said stop: the run ends on the last step's prediction instead of raising."""


class _Blend:
    """Inpainting with a 4-channel U-Net, as diffusers: after each step the kept region is replaced by the
    init latents noised to the next noise level.

    The samplers hand the denoiser the very tensor they continue from (in VE scale), so the blend due
    after step i is applied to it in place at the start of step i + 1; the one after the last step
    (clean init latents) is `finish`.
    """

    def __init__(self, inpaint: Inpaint, plan: sampling.Plan):
        self.inpaint = inpaint
        self.sigmas = plan.sigmas.tolist()  # Python floats: no device reads in the loop
        self.due: int | None = None  # the step whose start still needs the blend

    def step_done(self, step: int) -> None:
        self.due = step + 1

    def wrap(self, denoiser: Callable[[Tensor, object], Tensor]) -> Callable[[Tensor, object], Tensor]:
        def denoise(x: Tensor, sigma) -> Tensor:
            if self.due is not None:
                kept = self.inpaint.image_latents + self.sigmas[self.due] * self.inpaint.noise
                x.copy_(torch.lerp(kept, x, self.inpaint.mask))
                self.due = None
            return denoiser(x, sigma)

        return denoise

    def finish(self, x: Tensor) -> Tensor:
        return torch.lerp(self.inpaint.image_latents, x, self.inpaint.mask)


@dataclass
class _Hooks:
    """A call's callbacks (see `Pipeline.generate`)."""

    callback: Callable | None = None
    cancel: Callable[[], bool] | None = None
    preview: Callable | None = None
    interrupt: Callable[[], bool] | None = None


@dataclass
class _Run:
    """What the stages of one run share."""

    options: GenerationOptions  # with cfg resolved
    width: int
    height: int
    generators: list[torch.Generator]  # one CPU generator per image, seeded seed + i
    init: Tensor | None  # (1, 3, H, W) in [-1, 1]: img2img / inpaint
    mask: Tensor | None  # (1, 1, H, W), 1 = repaint
    progress: _Progress
    cancel: Callable[[], bool] | None
    interrupt: Callable[[], bool] | None = None
    embeddings: Mapping[str, object] | None = None  # name -> textual-inversion Embedding, read when used
    inpaint: Inpaint | None = None
    calls: _Calls = field(default_factory=_Calls)
    interrupted: bool = False

    def stop(self) -> bool:
        """The samplers' cancel(): Cancelled for cancel(), _Interrupted for interrupt()."""
        if self.cancel is not None and self.cancel():
            raise Cancelled()
        if self.interrupt is not None and self.interrupt():
            raise _Interrupted()
        return False


@dataclass
class _Stage:
    """One model's part of a run: the base, or the refiner finishing the base's latents."""

    parts: Components
    plan: sampling.Plan


class Pipeline:
    """An SDXL model (and optionally a refiner) ready to generate. Build it with `sdxl.load`."""

    def __init__(self, base: Components, refiner: Components | None = None, *, compile: bool | str = False,
                 offload: str | None = None, device: torch.device | str | None = None, fp8: bool = False,
                 quantise: str | None = None,
                 lora_dirs: Sequence[str | Path] = (), embedding_dirs: Sequence[str | Path] = (),
                 allow_adapter_paths: bool = True, release_text_encoders: bool = False):
        """compile: torch.compile the U-Nets' forward (True, or a torch.compile mode name), compiled on
        the first image of each size and reused after; see `sdxl.acceleration.compile_unet`.
        offload: "model" or "sequential" keeps the weights in CPU memory and copies a component
        ("model") or one layer at a time ("sequential") to `device` only while it runs; see
        `sdxl.acceleration.Offload`. device: where offloaded components run (default: where the
        U-Net's weights are now); without offload every component runs where its weights are.
        fp8: keep the U-Nets' linear-layer weights in float8 (`sdxl.acceleration.store_fp8`): about
        half a float16 U-Net's memory, images close to (not equal to) the plain ones. quantise: the same with
        another format, "fp8" or "int8" (`acceleration.Int8Linear`: as small, 5x faster to widen on the CPU).
        lora_dirs / embedding_dirs: where `<lora:NAME:W>` tags and `loras=[(NAME, W)]` find LoRA files, and where
        textual-inversion embeddings (used by their file names in prompts) are. allow_adapter_paths: whether
        `loras` may name files by path (a server that takes requests from others says False).
        release_text_encoders: free the text encoders' weights once a call's prompts are encoded and read them
        again from the file when a new prompt comes (`sdxl.checkpoints.resident`; the low-memory mode): the same
        conditioning, less memory while sampling, a second or two of reading per new prompt.
        """
        for name, parts in (("model", base), ("refiner", refiner)):
            if parts is not None and (parts.unet is None or parts.vae is None or parts.text_encoder_2 is None):
                raise ValueError(f"the {name} needs a U-Net, a VAE and the OpenCLIP bigG text encoder")
        check_modes(compile, offload)
        quantise = quantise or ("fp8" if fp8 else None)
        if quantise is not None and quantise not in QUANTISED:
            raise ValueError(f"quantise must be one of {', '.join(QUANTISED)} or None, got {quantise!r}")
        if release_text_encoders and offload is not None:
            raise ValueError("release_text_encoders and offload do not combine (offload keeps every weight in "
                             "CPU memory); use one of them")
        self.base, self.refiner = base, refiner
        self.release_text_encoders = release_text_encoders
        self.prompts = PromptCache(size=16, before_encode=self._restore_encoders)  # repeated prompts encoded once
        self.lora_library = Library(lora_dirs, LORA_SUFFIXES, kind="LoRA", aliases=True)
        self.embedding_library = Library(embedding_dirs, EMBEDDING_SUFFIXES, kind="embedding")
        self.allow_adapter_paths = allow_adapter_paths
        self.max_pixels = MAX_PIXELS  # width x height x batch per call (options.check_pixels); raise it on purpose
        self.adapters = Active()  # the LoRAs merged into the base now
        self.last_loras: list[tuple[str, Path, float, float]] = []  # (name, file, U-Net, text-encoder weight)
        self._embeddings: dict[int, Embeddings] = {}
        stages = [p for p in (base, refiner) if p is not None]
        if quantise:  # first: offload pins, and compile traces, the quantised tensors (no-op if loaded so)
            for parts in stages:
                store_quantised(parts.unet, quantise)
        self.offload: Offload | None = None
        if offload is not None:
            components = [m for p in stages for m in (p.text_encoder, p.text_encoder_2, p.unet, p.vae) if m is not None]
            self.offload = Offload(offload, device or execution_device(base.unet), components)
        if compile:
            for parts in stages:
                compile_unet(parts.unet, mode=None if compile is True else compile)

    @property
    def device(self) -> torch.device:
        """Where the models run (with offload: where they are copied to while they run)."""
        return execution_device(self.base.unet)

    @property
    def dtype(self) -> torch.dtype:
        return _param(self.base.unet).dtype

    # -- public API

    def generate(self, prompt: str | None = None, *, callback=None, cancel=None, preview=None, interrupt=None,
                 options: GenerationOptions | None = None, **overrides):
        """Generate images. Keyword arguments are the fields of `GenerationOptions` (or pass `options`).

        callback(step, total, latents): after every step, step = 1 .. total (base and refiner steps, and both
        passes of a hires fix, counted together). preview(step, total, denoised): the same, with the step's
        prediction of the clean latents (what live previews show; not read here, so no device sync). cancel():
        asked before the first step and between steps; True stops the run with `sdxl.pipeline.Cancelled`.
        interrupt(): asked as cancel is; True ends the run early on the last step's prediction, which is decoded
        and returned as if the run had finished (AUTOMATIC1111's Interrupt); `last_interrupted` then says so.
        Returns a list of PIL images, a float32 array (B, H, W, 3) in [0, 1] for output="np", or the
        final latents (B, 4, H/8, W/8) for output="latent".
        Inpainting (mask or outpaint) runs the main model only, without the refiner.
        """
        if prompt is not None:
            overrides["prompt"] = prompt
        options = options.replace(**overrides) if options else GenerationOptions(**overrides)
        return self.run(options, callback=callback, cancel=cancel, preview=preview, interrupt=interrupt)

    def refine(self, image, prompt: str = "", *, strength: float = 0.3, callback=None, cancel=None, **overrides):
        """The refiner as plain image-to-image on a finished image."""
        model = self.refiner or (self.base if self.base.kind == "refiner" else None)
        if model is None:
            raise ValueError("no refiner loaded: pass refiner=... to sdxl.load")
        options = GenerationOptions(prompt=prompt, init_image=image, strength=strength, **overrides)
        return self.run(options, callback=callback, cancel=cancel, model=model, refiner=None)

    def recommended_cfg(self, model: Components | None = None) -> float:
        """The guidance scale used when none is given: the model file's recommendation, else 5."""
        return float((model or self.base).recommended.get("cfg", DEFAULT_CFG))

    def run(self, o: GenerationOptions, *, callback=None, cancel=None, preview=None, interrupt=None,
            model: Components | None = None, refiner: Components | None | bool = True):
        """The one generation loop behind `generate` and `refine`."""
        model = model or self.base
        refiner = self.refiner if refiner is True else refiner
        self.last_interrupted = False
        try:
            if o.hires is not None:
                return self._hires(o, _Hooks(callback, cancel, preview, interrupt), model, refiner)
            return self._run(o, _Hooks(callback, cancel, preview, interrupt), model, refiner)
        finally:
            if self.offload is not None:
                self.offload.unload()  # model offload: nothing stays on the device between calls

    def resolve_loras(self, o: GenerationOptions) -> tuple[GenerationOptions, list[tuple[str, Path, float, float]]]:
        """(the options with their prompts' `<lora:...>` tags removed, the LoRAs asked for: `o.loras`, then the
        tags, as (name, file, U-Net weight, text-encoder weight)). ValueError for a name not in the LoRA folders."""
        texts, tags = {}, []
        for key in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
            if getattr(o, key):
                texts[key], found = extract_networks(getattr(o, key))
                tags += found
        wanted = [(name, u, t) for name, u, t in o.loras]
        for tag in tags:
            if tag.kind != "lora":
                warnings.warn(f"<{tag.kind}:{tag.name}>: sdxl has no {tag.kind!r} networks; the tag is ignored")
            else:
                wanted.append((tag.name, tag.unet, tag.te))
        return o.replace(**texts), [(name, self._lora_file(name), u, t) for name, u, t in wanted]

    def _lora_file(self, name: str) -> Path:
        path = Path(name).expanduser()
        if self.allow_adapter_paths and (path.suffix.lower() in LORA_SUFFIXES or path.is_file()):
            if not path.is_file():
                raise FileNotFoundError(f"LoRA {name}: no such file")
            return path
        return self.lora_library.find(name)

    def _prepare(self, o: GenerationOptions, model: Components) -> tuple[GenerationOptions, Embeddings | None]:
        """The adapters this call asks for merged into `model` (the last call's taken out), its embeddings."""
        o, loras = self.resolve_loras(o)
        if loras or self.adapters.applied is not None:
            self._restore_encoders(model)  # adapters merge into (and restore) the weights themselves
        if self.adapters.set(model, [(path, u, t) for _, path, u, t in loras]):
            self.prompts.clear()  # the text encoders' weights changed
        self.last_loras = loras
        if not self.embedding_library.folders:
            return o, None
        if id(model) not in self._embeddings:
            self._embeddings[id(model)] = Embeddings(self.embedding_library, model)
        return o, self._embeddings[id(model)]

    @torch.no_grad()
    def _run(self, o: GenerationOptions, hooks: _Hooks, model: Components, refiner: Components | None,
             progress: _Progress | None = None):
        if o.cfg is None:
            o = o.replace(cfg=self.recommended_cfg(model))
        o, embeddings = self._prepare(o, model)
        init, mask, width, height = _images_in(o, model)
        check_pixels(o.replace(width=width, height=height), self.max_pixels)  # before anything is allocated
        _check_channels(model, mask)
        stages = _stages(model, refiner if mask is None else None, o, strength=o.strength if init is not None or
                         o.init_latents is not None else 1.0)
        gens = [torch.Generator().manual_seed(o.seed + i) for i in range(o.batch)]
        progress = progress or _Progress(hooks.callback, sum(s.plan.steps for s in stages), hooks.preview)
        run = _Run(o, width, height, gens, init, mask, progress, hooks.cancel, hooks.interrupt, embeddings)
        x = self._start(run, stages[0])
        for stage in stages:
            x = self._denoise(stage, run, x)
            if run.interrupted:
                self.last_interrupted = True
                break
        return self._decode(x, stages[-1].parts, o)

    def _hires(self, o: GenerationOptions, hooks: _Hooks, model: Components, refiner: Components | None):
        """AUTOMATIC1111's hires fix: the first pass (base only) at o's size, its latents upscaled, then
        image-to-image from them at the hires size (with the refiner, if any)."""
        h = o.hires
        first = o.replace(hires=None, output="latent")
        second = o.replace(hires=None, width=h.width, height=h.height, steps=h.steps or o.steps, strength=h.strength)
        check_pixels(second, self.max_pixels)
        trained = sampling.TrainingSchedule.from_diffusers(model.scheduler)
        steps = sampling.make_plan(trained, o.sampler, o.schedule, o.steps).steps
        steps += sum(s.plan.steps for s in _stages(model, refiner, second, strength=h.strength))
        progress = _Progress(hooks.callback, steps, hooks.preview)
        x = self._run(first, hooks, model, None, progress)
        if self.last_interrupted:  # AUTOMATIC1111 skips the second pass of an interrupted job
            return self._decode(x, model, o)
        up = upscale_latents(x, h.width // 8, h.height // 8, h.upscaler)
        return self._run(second.replace(init_latents=up, width=None, height=None), hooks, model, refiner, progress)

    def _restore_encoders(self, parts: Components) -> None:
        for name in ("text_encoder", "text_encoder_2"):
            if resident.is_released(getattr(parts, name)):
                resident.restore(getattr(parts, name), parts.origins[name])

    def _release_encoders(self, parts: Components) -> None:
        """With release_text_encoders: the encoders' weights freed until the next prompt (not while an adapter
        is merged into them: it would be lost)."""
        applied = self.adapters.applied
        if self.release_text_encoders and (applied is None or not applied.touches_text_encoders):
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(parts, name) is not None:
                    resident.release(getattr(parts, name), parts.origins.get(name))

    def _decode(self, x: Tensor, model: Components, o: GenerationOptions):
        if o.output == "latent":
            return x
        images = decode_latents(model.vae, x.to(execution_device(model.vae)), tiled=o.vae_tiling)
        return imaging.to_unit(images).numpy() if o.output == "np" else imaging.to_pil(images)

    # -- steps of `run`

    def _start(self, run: _Run, stage: _Stage) -> Tensor:
        """The starting latents, consuming each image's generator in diffusers' order (see `sdxl.latents`)."""
        model, o, plan = stage.parts, run.options, stage.plan
        device = execution_device(model.unet)
        shape = (1, 4, run.height // 8, run.width // 8)
        if o.init_latents is not None:  # the hires fix's second pass
            latents = o.init_latents.to(device, torch.float32).expand(len(run.generators), -1, -1, -1)
            return sampling.add_noise(latents, initial_noise(run.generators, shape, device), plan)
        if run.init is None:
            return initial_noise(run.generators, shape, device) * plan.init_noise_sigma
        if run.mask is None:
            latents = encode_image(model.vae, run.init, run.generators, tiled=o.vae_tiling).to(device)
            if o.resize_latents and latents.shape[2:] != shape[2:]:  # encoded at its own size
                latents = upscale_latents(latents, shape[3], shape[2])
            return sampling.add_noise(latents, initial_noise(run.generators, shape, device), plan)
        run.inpaint, x = inpaint_start(
            model.vae, run.init, run.mask, run.generators, plan, shape,
            nine_channels=model.unet.config.in_channels == 9, full=o.strength == 1.0, tiled=o.vae_tiling, device=device,
            fill=o.inpaint_fill,
        )
        return x

    def _denoise(self, stage: _Stage, run: _Run, x: Tensor) -> Tensor:
        parts, o, inpaint = stage.parts, run.options, run.inpaint
        cfg_pp = stage.plan.sampler in sampling.CFG_PP_SAMPLERS
        # CFG++ needs the unconditional prediction at every guidance scale (its scale is usually <= 1)
        cond = scheduled_conditioning(parts, o, run.width, run.height, self.prompts, embeddings=run.embeddings,
                                      negative=o.cfg > 1 or cfg_pp)
        self._release_encoders(parts)
        nine = inpaint is not None and parts.unet.config.in_channels == 9
        extra = torch.cat([inpaint.mask, inpaint.masked_latents], dim=1) if nine else None
        model_fn = guided_unet(parts.unet, cond, o.cfg, o.guidance_rescale, extra, uncond=cfg_pp, calls=run.calls)
        denoiser = sampling.Denoiser(model_fn, sampling.TrainingSchedule.from_diffusers(parts.scheduler), stage.plan)
        blend = _Blend(inpaint, stage.plan) if inpaint is not None and not nine else None

        last: list[Tensor] = []

        def on_step(step: int, steps: int, latents: Tensor, denoised: Tensor) -> None:
            if blend is not None:
                blend.step_done(step)
            last[:] = [denoised]
            run.progress.step(latents, denoised)

        try:
            x = sampling.sample(stage.plan, blend.wrap(denoiser) if blend else denoiser, x, generator=run.generators,
                                callback=on_step, cancel=run.stop)
        except _Interrupted:
            if not last:  # nothing made yet: an interrupt before the first step is a cancel
                raise Cancelled() from None
            run.interrupted, x = True, last[0]
        return blend.finish(x) if blend else x


def upscale_latents(x: Tensor, width: int, height: int, upscaler: str = "Latent") -> Tensor:
    """Latents resized to (height, width) latent pixels by one of AUTOMATIC1111's latent upscalers."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(x, size=(height, width), mode=mode, antialias=antialias, **corners)


def _images_in(o: GenerationOptions, model: Components) -> tuple[Tensor | None, Tensor | None, int, int]:
    """(init image, mask, width, height): the options' images prepared at the output size, which defaults to
    the init image's size (rounded down to a multiple of 8), else the model's native size."""
    init = mask = None
    if o.init_latents is not None:
        width, height = o.init_latents.shape[3] * 8, o.init_latents.shape[2] * 8
    elif o.init_image is not None:
        image, mask_image = o.init_image, o.mask
        if o.outpaint is not None:
            image, mask_image = imaging.outpaint_canvas(image, o.outpaint, fill=o.outpaint_fill)
        w0, h0 = imaging.image_size(image)
        width, height = o.width or w0 // 8 * 8, o.height or h0 // 8 * 8
        init = imaging.to_tensor(image, *((w0 // 8 * 8, h0 // 8 * 8) if o.resize_latents else (width, height)))
        if mask_image is not None:
            mask = imaging.prepare_mask(mask_image, width, height, o.mask_blur)
            if o.inpaint_fill == "fill":  # the masked region starts from the colours around it
                init = imaging.to_tensor(imaging.fill_masked(image, mask_image), width, height)
    else:
        native = model.unet.config.sample_size * 8  # the size the model was trained at: 1024 for SDXL
        width, height = o.width or native, o.height or native
    warn_if_untrained_size(width, height, model.unet.config.sample_size, stacklevel=5)
    return init, mask, width, height


def _check_channels(model: Components, mask: Tensor | None) -> None:
    channels = model.unet.config.in_channels
    if mask is not None and channels not in (4, 9):
        raise ValueError(f"inpainting needs a U-Net with 4 or 9 input channels, not {channels}")
    if mask is None and channels != 4:
        raise ValueError(f"this U-Net takes {channels} input channels (an inpainting model): "
                         "give an init_image and a mask (or outpaint padding)")


def _stages(model: Components, refiner: Components | None, o: GenerationOptions, strength: float) -> list[_Stage]:
    """The base runs to refiner_switch of the schedule, the refiner from there (inpainting: the base only)."""
    use_refiner = refiner is not None and o.refiner_switch is not None

    def plan(parts: Components, **trim) -> sampling.Plan:
        training = sampling.TrainingSchedule.from_diffusers(parts.scheduler)
        return sampling.make_plan(training, o.sampler, o.schedule, o.steps, **trim)

    stages = [_Stage(model, plan(model, strength=strength, denoising_end=o.refiner_switch if use_refiner else None))]
    if use_refiner:
        stages.append(_Stage(refiner, plan(refiner, denoising_start=o.refiner_switch)))
    return stages


# ---------------------------------------------------------------------------------------------
# Loading.


def load(model: str | Path, refiner: str | Path | None = None, *, device=None, dtype=None,
         vae: str | Path | None = None, variant: str | None = None, compile: bool | str = False,
         offload: str | None = None, fp8: bool = False, progress: Callable[[str], None] | None = None,
         lora_dirs: Sequence[str | Path] = (), embedding_dirs: Sequence[str | Path] = (),
         low_memory: bool = False, quantise: str | None = None) -> Pipeline:
    """Load a model (and a refiner) into a `Pipeline`.

    model / refiner: an official-layout single file, a diffusers folder, a built-in model name ("builtin",
    "builtin-refiner"), or a Hub repo id already in the local cache. device / dtype: torch objects or strings
    ("cuda", "fp16", ...; default CPU and float32). vae: a VAE file (or diffusers VAE folder) used instead of the
    models' own, e.g. a VAE fixed for float16. compile / offload / fp8 / quantise: see `Pipeline`; with offload the weights
    are loaded into CPU memory and run on `device`. progress(name) is called as each model is loaded ("unet",
    "vae", ...). lora_dirs / embedding_dirs: see `Pipeline`. With fp8 / quantise the U-Nets are quantised as they
    are read, so they never exist in `dtype` whole.

    low_memory: for a machine with little memory (a full-size SDXL at 512x512 in under 5 GiB on the CPU): 8-bit
    U-Net weights (int8 on the CPU, fp8 on a GPU), the text encoders released after each prompt
    (`Pipeline(release_text_encoders=True)`), and, where dtype is not given, bfloat16 on a CPU that runs it faster
    than float32 (docs/low-memory.md says what each saves).
    """
    from .checkpoints.load import load as load_components
    from .checkpoints.load import load_vae

    check_modes(compile, offload)  # before the slow part
    if quantise is not None and quantise not in QUANTISED:
        raise ValueError(f"quantise must be one of {', '.join(QUANTISED)} or None, got {quantise!r}")
    if low_memory:
        dtype = dtype if dtype is not None else auto_dtype(device)
        quantise = quantise or ("fp8" if fp8 else low_memory_format(device))
    elif isinstance(dtype, str) and dtype == "auto":
        dtype = auto_dtype(device)
    device = torch.device(device) if device is not None else None
    run_on, device = (device, None) if offload is not None else (None, device)  # offload: weights stay in CPU memory
    quantise = quantise or ("fp8" if fp8 else None)
    formats = {"unet": quantise} if quantise else None
    base = load_components(resolve_path(model), dtype=dtype, device=device, variant=variant, progress=progress,
                           quantise=formats, mapped=not low_memory)  # mapped pages would stay in the RSS
    second = (load_components(resolve_path(refiner), dtype=dtype, device=device, variant=variant, quantise=formats,
                              mapped=not low_memory,
                              progress=progress and (lambda name: progress(f"refiner {name}"))) if refiner else None)
    if vae is not None:
        replacement = load_vae(resolve_path(vae), dtype=dtype, device=device)
        if progress is not None:
            progress("vae (replacement)")
        base.vae = replacement
        if second is not None:
            second.vae = replacement
    return Pipeline(base, second, compile=compile, offload=offload, device=run_on, quantise=quantise, lora_dirs=lora_dirs,
                    embedding_dirs=embedding_dirs, release_text_encoders=low_memory and offload is None)


def low_memory_format(device: torch.device | str | None) -> str:
    """The U-Net's weight format in low-memory mode: int8 on the CPU (widened 5x faster than float8 there), fp8
    elsewhere (GPUs widen either fast, and some multiply float8 natively)."""
    return "int8" if device is None or torch.device(device).type == "cpu" else "fp8"


def auto_dtype(device: torch.device | str | None) -> torch.dtype:
    """`dtype="auto"`: float16 on a GPU (what SDXL tools run there; an official VAE that overflows is decoded in
    float32), bfloat16 on a CPU where it measures `BF16_WORTH` times faster than float32, else float32."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cpu":
        return torch.bfloat16 if cpu_bf16_speedup() >= BF16_WORTH else torch.float32
    return torch.float16
