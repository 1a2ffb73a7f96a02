// Generation parameters stored in a PNG (read by POST /sdapi/v1/png-info) -> the form's field values.
//
// Three sources, the most exact first: sdxl's own "sdxl" JSON chunk (our ids), Fooocus' JSON "parameters"
// (fooocus_scheme "fooocus"), and AUTOMATIC1111's infotext (A1111, Forge, Fooocus' a1111 scheme, and sdxl too).
// Sampler and schedule names are matched against the server's lists (GET /sdapi/v1/samplers, /schedulers).

const lower = (s) => String(s ?? "").trim().toLowerCase();

export function findSampler(name, samplers) {
  const n = lower(name);
  if (!n) return null;
  for (const s of samplers) {
    if (lower(s.name) === n || (s.aliases || []).some((a) => lower(a) === n)) return s.name;
  }
  return null;
}

export function findScheduler(name, schedulers) {
  const n = lower(name);
  if (!n) return null;
  for (const s of schedulers) {
    if (lower(s.name) === n || lower(s.label) === n || (s.aliases || []).some((a) => lower(a) === n)) return s.name;
  }
  return null;
}

// (sampler, scheduler) from a sampler name and an optional schedule; A1111 before 1.9 wrote both in one
// ("DPM++ 2M Karras"), Fooocus writes "dpmpp_2m_sde_gpu" and "karras".
export function samplerAndSchedule(sampler, schedule, samplers, schedulers) {
  let s = findSampler(sampler, samplers);
  let k = schedule ? findScheduler(schedule, schedulers) : "automatic";
  if (!s && sampler) {
    for (const sch of schedulers) {
      for (const word of [sch.label, sch.name]) {
        const suffix = ` ${lower(word)}`;
        if (word && lower(sampler).endsWith(suffix)) {
          const found = findSampler(String(sampler).trim().slice(0, -suffix.length), samplers);
          if (found) {
            s = found;
            k = k === "automatic" || !k ? sch.name : k;
          }
        }
      }
    }
  }
  return { sampler: s, scheduler: k };
}

function size(value) {
  const m = /(\d+)\s*[x×,]\s*(\d+)/i.exec(String(value ?? ""));
  return m ? [Number(m[1]), Number(m[2])] : null;
}

function number(value) {
  if (value === null || value === undefined || value === "") return null;
  const n = Number(String(value).trim());
  return Number.isFinite(n) ? n : null;
}

function loraTags(loras) {
  return (loras || [])
    .map((l) => (Array.isArray(l) ? l : null))
    .filter(Boolean)
    .map(([name, unet, text]) => {
      const stem = String(name).split(/[\\/]/).pop().replace(/\.(safetensors|pt|ckpt|bin)$/i, "");
      const u = Number(unet);
      const t = text === undefined ? u : Number(text);
      return t === u ? `<lora:${stem}:${u}>` : `<lora:${stem}:${t}:${u}>`;
    })
    .join(" ");
}

function withTags(prompt, tags) {
  return tags ? `${prompt || ""}${prompt ? " " : ""}${tags}` : prompt || "";
}

// {prompt, negative_prompt, steps, cfg_scale, seed, width, height, sampler (our id or a name), schedule, model,
//  refiner, refiner_switch_at, denoising_strength}: whichever the source has.
function fromSdxl(j) {
  return {
    prompt: withTags(j.prompt, loraTags(j.loras)),
    negative_prompt: j.negative_prompt ?? "",
    steps: number(j.steps),
    cfg_scale: number(j.cfg),
    seed: number(j.seed),
    width: Array.isArray(j.size) ? j.size[0] : number(j.width),
    height: Array.isArray(j.size) ? j.size[1] : number(j.height),
    sampler: j.sampler,
    schedule: j.schedule,
    model: j.model,
    refiner: j.refiner,
    refiner_switch_at: j.refiner ? number(j.refiner_switch) : null,
    denoising_strength: j.init_image ? number(j.strength) : null,
  };
}

function fromFooocus(j) {
  const tags = Object.keys(j)
    .filter((k) => /^lora_combined_\d+$/.test(k))
    .map((k) => {
      const [name, weight] = String(j[k]).split(" : ");
      return name && weight !== undefined ? [name.trim(), Number(weight)] : null;
    })
    .filter((x) => x && x[0] && x[0] !== "None");
  const prompt = Array.isArray(j.full_prompt) ? j.full_prompt.join(", ") : j.full_prompt || j.prompt || "";
  const negative = Array.isArray(j.full_negative_prompt)
    ? j.full_negative_prompt.join(", ")
    : j.full_negative_prompt || j.negative_prompt || "";
  const wh = size(j.resolution);
  const refiner = j.refiner_model && j.refiner_model !== "None" ? j.refiner_model : null;
  return {
    prompt: withTags(prompt, loraTags(tags)),
    negative_prompt: negative,
    steps: number(j.steps),
    cfg_scale: number(j.guidance_scale),
    seed: number(j.seed),
    width: wh && wh[0],
    height: wh && wh[1],
    sampler: j.sampler,
    schedule: j.scheduler,
    model: j.base_model,
    refiner,
    refiner_switch_at: refiner ? number(j.refiner_switch) : null,
    denoising_strength: null,
  };
}

function fromA1111(p) {
  const wh = size(p.Size);
  const refiner = p.Refiner ? String(p.Refiner).replace(/\s*\[[0-9a-f]+\]$/i, "") : null;
  return {
    prompt: p.Prompt ?? "",
    negative_prompt: p["Negative prompt"] ?? "",
    steps: number(p.Steps),
    cfg_scale: number(p["CFG scale"]),
    seed: number(p.Seed),
    width: wh && wh[0],
    height: wh && wh[1],
    sampler: p.Sampler,
    schedule: p["Schedule type"] || p.Scheduler || null,
    model: p.Model ?? null,
    model_hash: p["Model hash"] ?? null,
    refiner,
    refiner_switch_at: refiner ? number(p["Refiner switch at"]) : null,
    denoising_strength: number(p["Denoising strength"]),
  };
}

function parseJson(text) {
  try {
    const v = JSON.parse(text);
    return v && typeof v === "object" && !Array.isArray(v) ? v : null;
  } catch {
    return null;
  }
}

// png-info's answer -> {source, values} or null when the image holds no generation parameters.
export function readPngInfo(info) {
  const items = info.items || {};
  if (typeof items.sdxl === "string") {
    const j = parseJson(items.sdxl);
    if (j) return { source: "sdxl", values: fromSdxl(j) };
  }
  const text = String(info.info || "");
  if (text.trim().startsWith("{") || lower(items.fooocus_scheme) === "fooocus") {
    const j = parseJson(text);
    if (j) return { source: "Fooocus", values: fromFooocus(j) };
  }
  const p = info.parameters || {};
  if (text.trim() && (p.Steps !== undefined || p.Sampler !== undefined || p.Seed !== undefined)) {
    return { source: "AUTOMATIC1111", values: fromA1111(p) };
  }
  return null;
}
