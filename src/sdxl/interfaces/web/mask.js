// The inpainting mask: painted with a mouse, pen or finger (pointer events) on a canvas laid over the init image.
// Painted pixels are repainted (white in the mask sent to the server), the rest is kept.

const MIN_CANVAS = 512; // the canvas' long side at least this many pixels, so strokes on small images look smooth

export class MaskPainter {
  constructor(canvas, { brush, onChange } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.brush = brush; // () -> brush diameter in screen pixels
    this.onChange = onChange || (() => {});
    this.erasing = false;
    this.width = 0; // the image's own size
    this.height = 0;
    this.painted = false;
    this.last = null;
    this.pointer = null;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      canvas.addEventListener(type, (e) => this.up(e));
    }
  }

  // A new image: a blank mask of its size.
  reset(width, height) {
    this.width = width;
    this.height = height;
    const k = Math.max(1, Math.ceil(MIN_CANVAS / Math.max(width, height)));
    this.canvas.width = width * k;
    this.canvas.height = height * k;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
    this.onChange();
  }

  invert() {
    const { width, height } = this.canvas;
    const data = this.ctx.getImageData(0, 0, width, height);
    const px = data.data;
    const [r, g, b] = this.colour();
    let any = false;
    for (let i = 0; i < px.length; i += 4) {
      const a = 255 - px[i + 3];
      px[i] = r;
      px[i + 1] = g;
      px[i + 2] = b;
      px[i + 3] = a;
      any ||= a > 0;
    }
    this.ctx.putImageData(data, 0, 0);
    this.painted = any;
    this.onChange();
  }

  colour() {
    return [236, 64, 122];
  }

  point(e) {
    const rect = this.canvas.getBoundingClientRect();
    return {
      x: ((e.clientX - rect.left) / rect.width) * this.canvas.width,
      y: ((e.clientY - rect.top) / rect.height) * this.canvas.height,
      scale: this.canvas.width / rect.width,
    };
  }

  down(e) {
    if (e.button !== 0 && e.pointerType === "mouse") return;
    if (!this.width) return;
    e.preventDefault();
    this.pointer = e.pointerId;
    this.canvas.setPointerCapture?.(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (this.pointer !== e.pointerId) return;
    e.preventDefault();
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const c of events.length ? events : [e]) {
      const p = this.point(c);
      this.stroke(this.last, p);
      this.last = p;
    }
  }

  up(e) {
    if (this.pointer !== e.pointerId) return;
    this.pointer = null;
    this.last = null;
    this.onChange();
  }

  stroke(a, b) {
    const ctx = this.ctx;
    const [r, g, bl] = this.colour();
    ctx.save();
    ctx.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    ctx.strokeStyle = `rgb(${r}, ${g}, ${bl})`;
    ctx.lineWidth = Math.max(1, this.brush() * b.scale);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x + (a.x === b.x && a.y === b.y ? 0.01 : 0), b.y);
    ctx.stroke();
    ctx.restore();
    if (!this.erasing) this.painted = true;
  }

  // Whether any pixel is painted (after erasing, checked pixel by pixel).
  isEmpty() {
    if (!this.width) return true;
    const px = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) return false;
    return true;
  }

  // The mask as the server takes it: a PNG data URL of the image's size, white = repaint, black = keep.
  toDataURL() {
    const tint = document.createElement("canvas");
    tint.width = this.canvas.width;
    tint.height = this.canvas.height;
    const t = tint.getContext("2d");
    t.drawImage(this.canvas, 0, 0);
    t.globalCompositeOperation = "source-in";
    t.fillStyle = "#fff";
    t.fillRect(0, 0, tint.width, tint.height);
    const out = document.createElement("canvas");
    out.width = this.width;
    out.height = this.height;
    const o = out.getContext("2d");
    o.fillStyle = "#000";
    o.fillRect(0, 0, out.width, out.height);
    o.drawImage(tint, 0, 0, out.width, out.height);
    return out.toDataURL("image/png");
  }
}
