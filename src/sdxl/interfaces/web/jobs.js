// The page's jobs: submitted to /sdxl/v1/jobs/*, followed one at a time through its event stream (progress,
// live previews, done); the ones waiting behind it are polled for their place in the server's queue. The
// unfinished ones are kept in the tab's sessionStorage, so that a reload follows them again (restore()).

import { get, post } from "./api.js";

const POLL_MS = 1500;
const STORE_KEY = "sdxl.jobs";
const FOLLOWED = ["queued", "running"];

// What a reload needs of a request: its settings, not its images (an init image would fill the storage).
function kept({ id, body, mode }) {
  const { init_images: _images, mask: _mask, ...rest } = body || {};
  return { id, mode, body: rest };
}

export class Jobs {
  constructor({ onProgress, onPreview, onFinished, onChange, store = globalThis.sessionStorage }) {
    this.onProgress = onProgress; // (job, status)
    this.onPreview = onPreview; // (job, dataURL)
    this.onFinished = onFinished; // async (job, status)
    this.onChange = onChange; // () : the list of jobs changed
    this.list = []; // {id, body, mode, status, finished}
    this.current = null;
    this.source = null;
    this.timer = null;
    this.store = store;
  }

  waiting() {
    return this.list.filter((j) => !j.finished && j !== this.current);
  }

  add(job) {
    job.status = { state: "queued", position: job.position ?? 0 };
    job.finished = false;
    this.list.push(job);
    this.save();
    this.pump();
    this.schedulePoll();
    this.onChange();
  }

  save() {
    try {
      this.store?.setItem(STORE_KEY, JSON.stringify(this.list.filter((j) => !j.finished).map(kept)));
    } catch {
      /* storage full or switched off: a reload forgets the jobs, which still run */
    }
  }

  // After a reload: the jobs this tab had submitted. Those still queued or running are followed again; those that
  // ended meanwhile are shown as ending (their images, an error), unless the server saved every image of theirs
  // (the gallery lists saved images already) or they were cancelled. Jobs the server no longer knows are dropped.
  async restore() {
    let entries = [];
    try {
      entries = JSON.parse(this.store?.getItem(STORE_KEY) || "[]");
    } catch {
      entries = [];
    }
    const ended = [];
    for (const entry of Array.isArray(entries) ? entries : []) {
      if (!entry || typeof entry.id !== "string") continue;
      let status;
      try {
        status = await get(`/sdxl/v1/jobs/${encodeURIComponent(entry.id)}`);
      } catch {
        continue;
      }
      const job = { id: entry.id, body: entry.body || {}, mode: entry.mode || "txt2img", status, finished: false };
      if (FOLLOWED.includes(status.state)) this.list.push(job);
      else if (status.state !== "cancelled" && !(status.images > 0 && status.saved === status.images)) {
        ended.push([job, status]);
      }
    }
    for (const [job, status] of ended) await this.finish(job, status);
    this.save();
    this.pump();
    if (this.waiting().length) this.schedulePoll();
    this.onChange();
  }

  pump() {
    if (this.current) return;
    const next = this.list.find((j) => !j.finished);
    if (!next) return;
    this.current = next;
    this.follow(next);
    this.onChange();
  }

  follow(job) {
    const source = new EventSource(`/sdxl/v1/jobs/${encodeURIComponent(job.id)}/events`);
    this.source = source;
    source.addEventListener("progress", (e) => {
      job.status = JSON.parse(e.data);
      this.onProgress(job, job.status);
    });
    source.addEventListener("preview", (e) => this.onPreview(job, e.data));
    source.addEventListener("done", (e) => {
      source.close();
      this.finish(job, JSON.parse(e.data));
    });
    source.onerror = async () => {
      if (source.readyState !== EventSource.CLOSED || job.finished) return; // CONNECTING: it reconnects itself
      try {
        const status = await get(`/sdxl/v1/jobs/${encodeURIComponent(job.id)}`);
        if (FOLLOWED.includes(status.state)) {
          this.follow(job); // the stream broke: follow again
          return;
        }
        this.finish(job, status);
      } catch (err) {
        this.finish(job, { state: "failed", error: err.message, lost: true });
      }
    };
  }

  async finish(job, status) {
    if (job.finished) return;
    job.finished = true;
    job.status = status;
    if (this.current === job) {
      this.current = null;
      this.source = null;
    }
    try {
      await this.onFinished(job, status);
    } finally {
      this.list = this.list.filter((j) => !j.finished);
      this.save();
      this.pump();
      this.onChange();
    }
  }

  async cancel(job) {
    if (!job || job.finished) return;
    try {
      const status = await post(`/sdxl/v1/jobs/${encodeURIComponent(job.id)}/cancel`);
      if (job !== this.current && status.state === "cancelled") this.finish(job, status);
    } catch (err) {
      if (err.status === 404) this.finish(job, { state: "cancelled" });
      else throw err;
    }
  }

  schedulePoll() {
    if (this.timer) return;
    this.timer = setInterval(() => this.poll(), POLL_MS);
  }

  async poll() {
    const waiting = this.waiting();
    if (!waiting.length) {
      clearInterval(this.timer);
      this.timer = null;
      return;
    }
    for (const job of waiting) {
      try {
        job.status = await get(`/sdxl/v1/jobs/${encodeURIComponent(job.id)}`);
        if (!FOLLOWED.includes(job.status.state)) this.finish(job, job.status);
      } catch {
        /* the next poll tries again */
      }
    }
    this.onChange();
  }
}
