// SDXL's multi-aspect buckets as size presets, scaled to the selected model (sdxl.training.data.buckets in JS).

// (width, height) of SDXL's ~1-megapixel training buckets (SDXL paper, appendix I; sdxl.options.SDXL_BUCKETS).
const SDXL_BUCKETS = [
  [2048, 512], [1984, 512], [1920, 512], [1856, 512], [1792, 576], [1728, 576], [1664, 576], [1600, 640],
  [1536, 640], [1472, 704], [1408, 704], [1344, 704], [1344, 768], [1280, 768], [1216, 832], [1152, 832],
  [1152, 896], [1088, 896], [1088, 960], [1024, 960], [1024, 1024], [960, 1024], [960, 1088], [896, 1088],
  [896, 1152], [832, 1152], [832, 1216], [768, 1280], [768, 1344], [704, 1408], [704, 1472], [640, 1536],
  [640, 1600], [576, 1664], [576, 1728], [576, 1792], [512, 1856], [512, 1920], [512, 1984], [512, 2048],
];

// A model's native size, from its entry in /sdapi/v1/sd-models (native_size: 64 for the built-in models, 1024 for
// SDXL); a model the server does not list is taken as SDXL. Sides are multiples of 8 below 512 pixels, else of 64.
export function nativeOf(model) {
  const given = Number(model?.native_size);
  const resolution = Number.isInteger(given) && given > 0 ? given : 1024;
  return { resolution, multiple: resolution < 512 ? 8 : 64 };
}

// The buckets scaled to area ~resolution^2 with sides multiples of `multiple`: of the four floor/ceil roundings,
// the one closest in aspect ratio and area (as sdxl.training.data.buckets), each size once.
export function buckets(resolution = 1024, multiple = 64) {
  const s = resolution / 1024;
  const out = [];
  for (const [w0, h0] of SDXL_BUCKETS) {
    const tw = w0 * s;
    const th = h0 * s;
    let best = null;
    let bestErr = Infinity;
    for (const f of [Math.floor, Math.ceil]) {
      for (const g of [Math.floor, Math.ceil]) {
        const w = Math.max(multiple, f(tw / multiple) * multiple);
        const h = Math.max(multiple, g(th / multiple) * multiple);
        const err = Math.abs(Math.log(w / h / (tw / th))) + Math.abs(Math.log((w * h) / (tw * th)));
        // min over (error, size), as Python's min(..., key=lambda c: (err(c), c)): equal errors go to the smaller size
        if (err < bestErr || (err === bestErr && (w < best[0] || (w === best[0] && h < best[1])))) {
          best = [w, h];
          bestErr = err;
        }
      }
    }
    if (!out.some(([w, h]) => w === best[0] && h === best[1])) out.push(best);
  }
  return out;
}

function gcd(a, b) {
  return b ? gcd(b, a % b) : a;
}

export function ratioLabel(w, h) {
  const d = gcd(w, h);
  const [a, b] = [w / d, h / d];
  if (a <= 21 && b <= 21) return `${a}:${b}`;
  return w >= h ? `${(w / h).toFixed(2)}:1` : `1:${(h / w).toFixed(2)}`;
}

// The bucket whose aspect ratio is closest to w/h (ties: the closest in area), as sdxl.training.data.nearest_bucket.
export function nearest(w, h, list) {
  const a = Math.log(w / h);
  let best = list[0];
  let key = [Infinity, Infinity];
  for (const [bw, bh] of list) {
    const k = [Math.abs(Math.log(bw / bh) - a), Math.abs(Math.log((bw * bh) / (w * h)))];
    if (k[0] < key[0] - 1e-12 || (Math.abs(k[0] - key[0]) <= 1e-12 && k[1] < key[1])) {
      best = [bw, bh];
      key = k;
    }
  }
  return best;
}

// The size to use for an image of w x h with this model: its own when it suits the model (sides multiples of 8,
// area at most 1.5x the model's), else the nearest bucket.
export function sizeFor(w, h, model) {
  const { resolution, multiple } = nativeOf(model);
  if (w % 8 === 0 && h % 8 === 0 && w * h <= 1.5 * resolution * resolution) return [w, h];
  return nearest(w, h, buckets(resolution, multiple));
}
