// The session's images: a gallery of thumbnails (newest first), the selected one large with its parameters and a
// download, and a lightbox to enlarge it. Each image's alt text starts with its prompt.

const $ = (id) => document.getElementById(id);

export function altOf(item) {
  return item.prompt ? `${item.prompt} (seed ${item.seed})` : `An image without a prompt (seed ${item.seed})`;
}

export class Gallery {
  constructor() {
    this.items = []; // {src, prompt, seed, infotext, body, mode, blobUrl?}
    this.selected = null;
    this.lastSeed = null;
    $("viewer-open").addEventListener("click", () => this.enlarge());
    $("lightbox").addEventListener("close", () => {
      $("lightbox-img").removeAttribute("src");
      $("lightbox-img").alt = "";
    });
    $("lightbox").addEventListener("click", (e) => {
      if (e.target === $("lightbox")) $("lightbox").close(); // a click on the backdrop
    });
    $("clear-history").addEventListener("click", () => this.clear());
  }

  // A finished job's /result (A1111's response: base64 PNGs, and `info` with the seeds and infotexts).
  add(job, result) {
    let info = {};
    try {
      info = JSON.parse(result.info || "{}");
    } catch {
      info = {};
    }
    const added = (result.images || []).map((b64, i) => ({
      src: b64.startsWith("data:") ? b64 : `data:image/png;base64,${b64}`,
      prompt: info.all_prompts?.[i] ?? job.body.prompt ?? "",
      seed: info.all_seeds?.[i] ?? info.seed,
      infotext: info.infotexts?.[i] ?? "",
      body: job.body,
      mode: job.mode,
    }));
    if (!added.length) return;
    this.items.unshift(...added.reverse());
    this.lastSeed = added[0].seed;
    this.select(this.items[0]);
  }

  // Images saved on the server (GET /sdxl/v1/outputs), after this session's: their settings come with them.
  addSaved(entries) {
    const known = new Set(this.items.map((item) => item.src));
    const saved = entries.filter((e) => !known.has(e.url)).map((e) => ({
      src: e.url, prompt: e.prompt ?? "", seed: e.seed, infotext: e.infotext ?? "", body: e.parameters, mode: "txt2img",
      saved: true,
    }));
    this.items.push(...saved);
    this.render();
  }

  clear() {
    for (const item of this.items) if (item.blobUrl) URL.revokeObjectURL(item.blobUrl);
    this.items = [];
    this.select(null);
  }

  render() {
    $("gallery").replaceChildren(...this.items.map((item) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.title = "Show this image";
      if (item === this.selected) button.setAttribute("aria-current", "true");
      const img = document.createElement("img");
      img.src = item.src;
      img.alt = altOf(item);
      img.decoding = "async";
      button.append(img);
      button.addEventListener("click", () => this.select(item));
      li.append(button);
      return li;
    }));
    $("gallery-empty").hidden = this.items.length > 0;
    $("clear-history").disabled = !this.items.length;
  }

  select(item) {
    this.selected = item;
    $("viewer").hidden = !item;
    if (item) this.show(item);
    this.render();
  }

  show(item) {
    const img = $("viewer-img");
    img.onload = () => img.classList.toggle("pixelated", Math.max(img.naturalWidth, img.naturalHeight) < 256);
    img.src = item.src;
    img.alt = altOf(item);
    $("viewer-info").textContent = item.infotext || `Seed: ${item.seed}`;
    const a = $("viewer-download");
    a.download = `sdxl-${item.seed ?? "image"}.png`;
    a.href = item.blobUrl || item.src;
    if (!item.blobUrl) {
      // a blob: URL, as some browsers refuse to download large data: URLs
      fetch(item.src)
        .then((r) => r.blob())
        .then((blob) => {
          item.blobUrl = URL.createObjectURL(blob);
          if (this.selected === item) a.href = item.blobUrl;
        })
        .catch(() => {});
    }
  }

  enlarge() {
    const item = this.selected;
    if (!item) return;
    const img = $("lightbox-img");
    img.src = item.src;
    img.alt = `Enlarged: ${altOf(item)}`;
    img.classList.toggle("pixelated", $("viewer-img").classList.contains("pixelated"));
    $("lightbox").showModal();
  }
}
