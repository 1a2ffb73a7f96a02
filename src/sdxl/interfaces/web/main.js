// sdxl's web UI: the form, the jobs, the gallery. It talks to the server's public routes only:
// /sdapi/v1/* (AUTOMATIC1111's lists, png-info) and /sdxl/v1/jobs/* (submit, events, result, cancel).

import { ApiError, get, post } from "./api.js";
import { clearError, clearErrors, showError } from "./errors.js";
import { Gallery } from "./gallery.js";
import { Jobs } from "./jobs.js";
import { MaskPainter } from "./mask.js";
import { findSampler, findScheduler, readPngInfo, samplerAndSchedule } from "./params.js";
import { buckets, nativeOf, nearest, ratioLabel, sizeFor } from "./sizes.js";

const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "sdxl-web:settings:v1";
const LORA_WEIGHT = 0.8;
const MODES = ["txt2img", "img2img", "inpaint"];

const state = {
  mode: "txt2img",
  samplers: [],
  schedulers: [],
  models: [],
  model: "", // the model the size and its presets are for
  init: null, // {src, width, height}
  promptTarget: null, // the prompt box a LoRA / embedding goes into: the one last focused
};

// -- settings kept in the browser

function settingElements() {
  return [...document.querySelectorAll("[data-setting]")];
}

function saveSettings() {
  const values = { mode: state.mode };
  for (const el of settingElements()) values[el.id] = el.type === "checkbox" ? el.checked : el.value;
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
  } catch {
    /* private mode or full: settings are just not kept */
  }
}

function storedSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") || {};
  } catch {
    return {};
  }
}

function setValue(el, value) {
  if (value === undefined || value === null) return false;
  if (el.type === "checkbox") {
    el.checked = Boolean(value);
    return true;
  }
  if (el.tagName === "SELECT" && ![...el.options].some((o) => o.value === String(value))) return false;
  el.value = String(value);
  return true;
}

// -- the lists the server offers

function fillSelect(select, entries, keep) {
  const previous = keep ?? select.value;
  const fixed = [...select.querySelectorAll("option[data-fixed]")];
  select.replaceChildren(...fixed);
  for (const [value, label] of entries) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    select.append(o);
  }
  setValue(select, previous);
}

async function loadLists() {
  const settled = await Promise.allSettled([
    get("/sdapi/v1/samplers"), get("/sdapi/v1/schedulers"), get("/sdapi/v1/sd-models"), get("/sdapi/v1/options"),
    get("/sdapi/v1/loras"), get("/sdapi/v1/embeddings"),
  ]);
  const [samplers, schedulers, models, options, loras, embeddings] = settled.map((s) =>
    s.status === "fulfilled" ? s.value : null);
  const failed = settled.find((s) => s.status === "rejected");
  if (failed && (!samplers || !models)) showError(failed.reason);

  state.samplers = samplers || [];
  state.schedulers = schedulers || [];
  state.models = models || [];
  fillSelect($("sampler_name"), state.samplers.map((s) => [s.name, s.name]));
  fillSelect($("scheduler"), state.schedulers.map((s) => [s.name, s.label || s.name]));
  fillSelect($("model"), state.models.map((m) => [m.title, m.title]));
  const refiner = $("refiner_checkpoint");
  fillSelect(refiner, state.models.map((m) => [m.title, m.title]));
  setValue($("sampler_name"), findSampler("DPM++ 2M", state.samplers) || state.samplers[0]?.name);
  setValue($("scheduler"), "automatic");
  if (options?.sd_model_checkpoint) setValue($("model"), options.sd_model_checkpoint);

  const loraPick = $("lora-pick");
  const aliased = (l) => (l.alias && l.alias !== l.name ? `${l.name} (${l.alias})` : l.name);
  fillSelect(loraPick, (loras || []).map((l) => [l.name, aliased(l)]), "");
  if (!loras?.length) loraPick.options[0].textContent = loras ? "None on the server" : "Unavailable";
  loraPick.disabled = !loras?.length;

  const embPick = $("embedding-pick");
  const names = Object.keys(embeddings?.loaded || {});
  fillSelect(embPick, names.map((n) => [n, n]), "");
  if (!names.length) embPick.options[0].textContent = embeddings ? "None on the server" : "Unavailable";
  embPick.disabled = !names.length;
}

// -- sizes

// The listed model of this title (its native_size sets the size presets).
function modelOf(title) {
  return state.models.find((m) => m.title === title);
}

function presets() {
  const { resolution, multiple } = nativeOf(modelOf($("model").value));
  return buckets(resolution, multiple);
}

function fillPresets() {
  const list = presets();
  const select = $("size-preset");
  const custom = document.createElement("option");
  custom.value = "";
  custom.textContent = "Custom";
  const options = list.map(([w, h]) => {
    const o = document.createElement("option");
    o.value = `${w}x${h}`;
    o.textContent = `${w} × ${h} (${ratioLabel(w, h)})`;
    return o;
  });
  select.replaceChildren(custom, ...options);
  syncPreset();
}

function syncPreset() {
  const value = `${$("width").value}x${$("height").value}`;
  const select = $("size-preset");
  select.value = [...select.options].some((o) => o.value === value) ? value : "";
}

function setSize(w, h) {
  $("width").value = String(w);
  $("height").value = String(h);
  clearError($("width"));
  clearError($("height"));
  syncPreset();
}

// A model of another native size: the size scaled to it (same aspect ratio), and its presets.
function modelChanged() {
  const before = nativeOf(modelOf(state.model));
  const after = nativeOf(modelOf($("model").value));
  state.model = $("model").value;
  if (before.resolution !== after.resolution) {
    // the same aspect ratio at the new model's size
    const w = Number($("width").value) || before.resolution;
    const h = Number($("height").value) || before.resolution;
    const [nw, nh] = nearest(w, h, buckets(after.resolution, after.multiple));
    setSize(nw, nh);
  }
  fillPresets();
}

// -- modes (tabs)

function setMode(mode, { focus = false } = {}) {
  if (!MODES.includes(mode)) mode = "txt2img";
  state.mode = mode;
  document.body.dataset.mode = mode;
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const on = tab.dataset.mode === mode;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    if (on) {
      $("form").setAttribute("aria-labelledby", tab.id);
      if (focus) tab.focus();
    }
  }
  $("init-section").hidden = mode === "txt2img";
  $("canvas-wrap").classList.toggle("no-mask", mode !== "inpaint");
}

function tabKeys(e) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const i = tabs.indexOf(document.activeElement);
  if (i < 0) return;
  let j = null;
  if (e.key === "ArrowRight") j = (i + 1) % tabs.length;
  else if (e.key === "ArrowLeft") j = (i - 1 + tabs.length) % tabs.length;
  else if (e.key === "Home") j = 0;
  else if (e.key === "End") j = tabs.length - 1;
  if (j === null) return;
  e.preventDefault();
  setMode(tabs[j].dataset.mode, { focus: true });
  saveSettings();
}

// -- the init image and its mask

let painter = null;

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name}: cannot be read`));
    reader.readAsDataURL(file);
  });
}

function imageSize(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve([img.naturalWidth, img.naturalHeight]);
    img.onerror = () => reject(new Error("not an image the browser can read"));
    img.src = src;
  });
}

async function setInit(src, { name = "image", resize = true } = {}) {
  let w, h;
  try {
    [w, h] = await imageSize(src);
  } catch (e) {
    showError(new ApiError(`${name}: ${e.message}`, 0, "init_images"));
    return;
  }
  state.init = { src, width: w, height: h };
  const img = $("init-preview");
  img.src = src;
  img.classList.toggle("pixelated", Math.max(w, h) < 256);
  const wrap = $("canvas-wrap");
  // as wide as there is room, and at most 70 % of the window's height
  wrap.style.width = `min(100%, ${((70 * w) / h).toFixed(2)}vh)`;
  wrap.hidden = false;
  $("init-empty").hidden = true;
  painter.reset(w, h);
  clearError($("init-image"));
  if (resize) {
    const [sw, sh] = sizeFor(w, h, modelOf($("model").value));
    setSize(sw, sh);
  }
  saveSettings();
}

async function initFromFile(file) {
  if (!file) return;
  try {
    await setInit(await readFile(file), { name: file.name });
  } catch (e) {
    showError(new ApiError(e.message, 0, "init_images"));
  }
}

// -- the request

function numberOf(id) {
  const raw = $(id).value.trim();
  const n = Number(raw);
  return raw !== "" && Number.isFinite(n) ? n : raw; // not a number: sent as typed, the server names the field
}

function requestBody() {
  const model = $("model").value;
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    seed: numberOf("seed"),
    steps: numberOf("steps"),
    cfg_scale: numberOf("cfg_scale"),
    sampler_name: $("sampler_name").value || null,
    scheduler: $("scheduler").value || null,
    width: numberOf("width"),
    height: numberOf("height"),
    n_iter: numberOf("n_iter"),
    batch_size: numberOf("batch_size"),
    override_settings: model ? { sd_model_checkpoint: model } : {}, // per request: users do not switch each other's
    override_settings_restore_afterwards: true,
    send_images: true,
  };
  const refiner = $("refiner_checkpoint").value;
  if (refiner && state.mode !== "inpaint") {
    body.refiner_checkpoint = refiner;
    body.refiner_switch_at = numberOf("refiner_switch_at");
  }
  if (state.mode !== "txt2img") {
    if (!state.init) throw new ApiError("Init image: choose or drop an image first", 0, "init_images");
    body.init_images = [state.init.src];
    body.denoising_strength = numberOf("denoising_strength");
    body.resize_mode = 0;
  }
  if (state.mode === "inpaint") {
    if (painter.isEmpty()) throw new ApiError("mask: paint over the part of the image to repaint", 0, "mask");
    body.mask = painter.toDataURL();
    body.mask_blur = numberOf("mask_blur");
    body.inpainting_fill = Number($("inpainting_fill").value);
    body.inpaint_full_res = $("inpaint_full_res").checked;
    body.inpaint_full_res_padding = numberOf("inpaint_full_res_padding");
  }
  return body;
}

async function generate() {
  clearErrors();
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e);
    return;
  }
  const route = state.mode === "txt2img" ? "txt2img" : "img2img";
  const button = $("generate");
  button.disabled = true;
  try {
    const { id, position } = await post(`/sdxl/v1/jobs/${route}`, body);
    jobs.add({ id, position, body, mode: state.mode });
    if (oneColumn()) $("run").scrollIntoView({ block: "start", behavior: "smooth" }); // where the progress is
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

// -- progress

const oneColumn = () => matchMedia("(max-width: 880px)").matches; // style.css' breakpoint

function inView(el) {
  const r = el.getBoundingClientRect();
  return r.bottom > 0 && r.top < innerHeight;
}

function formatSeconds(s) {
  if (!Number.isFinite(s) || s <= 0) return "";
  if (s < 60) return `${Math.ceil(s)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${String(Math.round(s % 60)).padStart(2, "0")} s`;
}

function setProgress(fraction) {
  const pct = Math.max(0, Math.min(100, Math.round(fraction * 1000) / 10)); // a tenth of a percent: long jobs move too
  $("progress").setAttribute("aria-valuenow", String(pct));
  $("progress").setAttribute("aria-valuetext", `${Math.floor(pct)} %`);
  $("progress-fill").style.width = `${pct}%`;
}

function queuedText(position) {
  if (position === undefined || position < 0) return "Queued.";
  if (position === 0) return "Queued: yours is next.";
  return `Queued: ${position} job${position === 1 ? "" : "s"} ahead of yours.`;
}

function onProgress(job, s) {
  if (job !== jobs.current) return;
  if (s.state === "queued") {
    setProgress(0);
    $("status").textContent = queuedText(s.position);
    return;
  }
  setProgress(s.progress || 0);
  const parts = [];
  if (s.steps) parts.push(`Step ${s.step}/${s.steps}`);
  else parts.push("Starting…");
  if (s.calls > 1) parts.push(`batch ${Math.min(s.call + 1, s.calls)}/${s.calls}`);
  const eta = formatSeconds(s.eta);
  if (eta) parts.push(`ETA ${eta}`);
  $("status").textContent = parts.join(" · ");
}

function onPreview(job, dataURL) {
  if (job !== jobs.current) return;
  $("preview").src = dataURL;
  $("preview-box").hidden = false;
}

async function onFinished(job, status) {
  $("preview-box").hidden = true;
  if (status.state === "failed") {
    setProgress(0);
    $("status").textContent = "Failed.";
    try {
      await get(`/sdxl/v1/jobs/${encodeURIComponent(job.id)}/result`);
      showError(new ApiError(status.error || "the job failed"));
    } catch (e) {
      showError(e.status ? e : new ApiError(status.error || e.message));
    }
    return;
  }
  if (status.state === "done" || status.images > 0) {
    try {
      const result = await get(`/sdxl/v1/jobs/${encodeURIComponent(job.id)}/result`);
      const watching = oneColumn() && inView($("run")); // on a phone, following the progress: on to the image
      gallery.add(job, result);
      if (watching) {
        await $("viewer-img").decode().catch(() => {}); // laid out at its size first: the page is tall enough
        $("run").scrollIntoView({ block: "start", behavior: "smooth" });
      }
    } catch (e) {
      showError(e);
    }
  }
  setProgress(status.state === "done" ? 1 : 0);
  const words = { done: "Done.", cancelled: "Cancelled." };
  $("status").textContent = words[status.state] || `${status.state}.`;
}

function renderQueue() {
  const list = $("queue");
  list.replaceChildren(...jobs.waiting().map((job) => {
    const li = document.createElement("li");
    const words = (job.body.prompt || "(no prompt)").slice(0, 60);
    const where = job.status?.state === "running" ? "running" : queuedText(job.status?.position).replace("Queued: ", "");
    li.textContent = `${words} — ${where}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove the queued job “${words}”`);
    remove.addEventListener("click", () => jobs.cancel(job).catch(showError));
    li.append(remove);
    return li;
  }));
  $("cancel").disabled = !jobs.current;
  if (!jobs.current && !jobs.waiting().length) $("generate").textContent = "Generate";
  else $("generate").textContent = "Generate (queue another)";
}

const jobs = new Jobs({ onProgress, onPreview, onFinished, onChange: renderQueue });
let gallery = null; // made in install(), once the page is there

async function sendTo(mode) {
  const item = gallery.selected;
  if (!item) return;
  setMode(mode);
  await setInit(item.src, { name: "the image" });
  saveSettings();
  $("init-section").scrollIntoView({ block: "start", behavior: "smooth" });
  document.querySelector(`[role="tab"][data-mode="${mode}"]`).focus({ preventScroll: true });
}

// -- parameters: from an image's text chunks, or a gallery item

function modelByName(name, hash) {
  const n = String(name || "").trim().toLowerCase();
  const h = String(hash || "").trim().toLowerCase();
  return state.models.find((m) =>
    [m.title, m.model_name, m.filename].some((x) => x && String(x).toLowerCase() === n) ||
    (h && m.hash && m.hash.toLowerCase() === h) ||
    (n && m.filename && m.filename.toLowerCase().replace(/\.[^.]+$/, "") === n)) || null;
}

// values (params.js) -> the fields; returns [the fields set, the notes about what was not].
function applyValues(v) {
  const set = [];
  const notes = [];
  const put = (id, value, label) => {
    if (value === null || value === undefined || value === "") return;
    if (setValue($(id), value)) {
      clearError($(id));
      set.push(label);
    }
  };
  put("prompt", v.prompt, "prompt");
  put("negative_prompt", v.negative_prompt ?? "", "negative prompt");
  if (v.negative_prompt === "") $("negative_prompt").value = "";
  put("steps", v.steps, "steps");
  put("cfg_scale", v.cfg_scale, "CFG scale");
  put("seed", v.seed, "seed");
  if (v.sampler) {
    const { sampler, scheduler } = samplerAndSchedule(v.sampler, v.schedule, state.samplers, state.schedulers);
    if (sampler) put("sampler_name", sampler, "sampler");
    else notes.push(`sampler “${v.sampler}” is not one of this server's`);
    if (scheduler) put("scheduler", scheduler, "schedule");
    else if (v.schedule) notes.push(`schedule “${v.schedule}” is not one of this server's`);
  } else if (v.schedule) {
    const scheduler = findScheduler(v.schedule, state.schedulers);
    if (scheduler) put("scheduler", scheduler, "schedule");
  }
  if (v.model) {
    const m = modelByName(v.model, v.model_hash);
    if (m) {
      put("model", m.title, "model");
      state.model = m.title; // the size comes with the parameters: only the presets follow the model
      fillPresets();
    } else notes.push(`model “${v.model}” is not on this server (kept ${$("model").value})`);
  }
  if (v.width && v.height) {
    setSize(v.width, v.height);
    set.push("size");
  }
  if (v.refiner) {
    const r = modelByName(v.refiner);
    if (r) {
      put("refiner_checkpoint", r.title, "refiner");
      put("refiner_switch_at", v.refiner_switch_at, "switch point");
    } else notes.push(`refiner “${v.refiner}” is not on this server`);
  }
  put("denoising_strength", v.denoising_strength, "denoising strength");
  syncPreset();
  saveSettings();
  return [set, notes];
}

async function loadParameters(file) {
  if (!file) return;
  const note = $("load-params-note");
  const error = $("load-params-error");
  error.hidden = true;
  note.textContent = `Reading ${file.name}…`;
  try {
    const image = await readFile(file);
    const info = await post("/sdapi/v1/png-info", { image });
    const found = readPngInfo(info || {});
    if (!found) {
      note.textContent = "";
      showError(new ApiError(`${file.name} holds no generation parameters`), "load-params-error");
      return;
    }
    const [set, notes] = applyValues(found.values);
    note.textContent = `Loaded from ${file.name} (${found.source}): ${set.join(", ") || "nothing"}.` +
      (notes.length ? ` Not used: ${notes.join("; ")}.` : "");
  } catch (e) {
    note.textContent = "";
    showError(e, "load-params-error");
  }
}

function useItemParameters(item) {
  const b = item.body;
  applyValues({
    prompt: b.prompt, negative_prompt: b.negative_prompt, steps: b.steps, cfg_scale: b.cfg_scale, seed: item.seed,
    width: b.width, height: b.height, sampler: b.sampler_name, schedule: b.scheduler,
    model: b.override_settings?.sd_model_checkpoint,
  });
}

// -- prompts: LoRAs and embeddings go where the caret is

function insertIntoPrompt(text) {
  const box = state.promptTarget || $("prompt");
  const start = box.selectionStart ?? box.value.length;
  const end = box.selectionEnd ?? start;
  const before = box.value.slice(0, start);
  const after = box.value.slice(end);
  const pad = before && !/\s$/.test(before) ? " " : "";
  const tail = after && !/^\s/.test(after) ? " " : "";
  box.value = `${before}${pad}${text}${tail}${after}`;
  const caret = (before + pad + text).length;
  box.focus();
  box.setSelectionRange(caret, caret);
  box.dispatchEvent(new Event("input", { bubbles: true }));
}

// -- drag and drop: an image on the init area is the init image, anywhere else its parameters are read

function hasFiles(e) {
  return [...(e.dataTransfer?.types || [])].includes("Files");
}

function installDrops() {
  const overlay = $("drop-overlay");
  const zone = $("init-drop");
  let depth = 0;
  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    overlay.hidden = zone.contains(e.target);
  });
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    const onZone = zone.contains(e.target) && state.mode !== "txt2img";
    overlay.hidden = onZone;
    zone.classList.toggle("over", onZone);
  });
  window.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    depth = Math.max(0, depth - 1);
    if (!depth) {
      overlay.hidden = true;
      zone.classList.remove("over");
    }
  });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (!file) return;
    if (zone.contains(e.target) && state.mode !== "txt2img") initFromFile(file);
    else loadParameters(file);
  });
}

// -- wiring

function install() {
  painter = new MaskPainter($("mask-canvas"), {
    brush: () => Number($("brush-size").value) || 24,
    onChange: () => ($("mask-error").hidden = true),
  });
  gallery = new Gallery();

  $("generate").addEventListener("click", generate);
  $("form").addEventListener("submit", (e) => e.preventDefault());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !e.repeat) {
      e.preventDefault();
      generate();
    }
  });
  $("cancel").addEventListener("click", () => {
    $("status").textContent = "Cancelling…";
    jobs.cancel(jobs.current).catch(showError);
  });

  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => {
      setMode(tab.dataset.mode);
      saveSettings();
    });
    tab.addEventListener("keydown", tabKeys);
  }

  for (const el of settingElements()) {
    el.addEventListener(el.tagName === "SELECT" || el.type === "checkbox" ? "change" : "input", () => {
      clearError(el);
      saveSettings();
    });
  }
  for (const id of ["prompt", "negative_prompt"]) $(id).addEventListener("focus", () => (state.promptTarget = $(id)));

  $("model").addEventListener("change", () => {
    modelChanged();
    saveSettings();
  });
  $("size-preset").addEventListener("change", () => {
    const v = $("size-preset").value;
    if (!v) return;
    const [w, h] = v.split("x").map(Number);
    setSize(w, h);
    saveSettings();
  });
  for (const id of ["width", "height"]) $(id).addEventListener("input", syncPreset);
  $("swap-size").addEventListener("click", () => {
    setSize($("height").value, $("width").value);
    saveSettings();
  });
  $("seed-random").addEventListener("click", () => {
    $("seed").value = "-1";
    clearError($("seed"));
    saveSettings();
  });
  $("seed-reuse").addEventListener("click", () => {
    const seed = gallery.selected?.seed ?? gallery.lastSeed;
    if (seed === null || seed === undefined) {
      $("status").textContent = "No image yet: the seed stays as it is.";
      return;
    }
    $("seed").value = String(seed);
    clearError($("seed"));
    saveSettings();
  });

  $("lora-pick").addEventListener("change", () => {
    const name = $("lora-pick").value;
    $("lora-pick").value = "";
    if (name) insertIntoPrompt(`<lora:${name}:${LORA_WEIGHT}>`);
  });
  $("embedding-pick").addEventListener("change", () => {
    const name = $("embedding-pick").value;
    $("embedding-pick").value = "";
    if (name) insertIntoPrompt(name);
  });

  $("load-params").addEventListener("change", () => loadParameters($("load-params").files[0]));
  $("init-image").addEventListener("change", () => initFromFile($("init-image").files[0]));
  $("eraser").addEventListener("click", () => {
    painter.erasing = !painter.erasing;
    $("eraser").setAttribute("aria-pressed", String(painter.erasing));
  });
  $("mask-clear").addEventListener("click", () => painter.clear());
  $("mask-invert").addEventListener("click", () => painter.invert());

  $("send-img2img").addEventListener("click", () => sendTo("img2img"));
  $("send-inpaint").addEventListener("click", () => sendTo("inpaint"));
  $("use-params").addEventListener("click", () => gallery.selected && useItemParameters(gallery.selected));
  installDrops();
}

async function start() {
  install();
  await loadLists();
  const stored = storedSettings();
  const defaults = nativeOf(modelOf($("model").value));
  setSize(defaults.resolution, defaults.resolution);
  for (const el of settingElements()) setValue(el, stored[el.id]);
  setMode(stored.mode);
  state.model = $("model").value;
  fillPresets();
  gallery.render();
  try {
    gallery.addSaved(await get("/sdxl/v1/outputs?limit=60")); // the server's saved images, if it keeps any
  } catch {
    // an older server, or none saved: the session's images only
  }
  await jobs.restore(); // a reload: the jobs this tab had submitted, followed again
  document.body.dataset.ready = "true"; // the lists are in (tests and scripts wait for it)
}

start();
