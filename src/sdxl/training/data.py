"""Image-caption folders for training, with SDXL's aspect-ratio buckets and size / crop micro-conditioning.

Folder layout (either caption source, or both; metadata wins where both give a caption):
- sidecar captions: `cat.png` next to `cat.txt` (UTF-8, stripped), images found recursively;
- a `metadata.jsonl` at the folder root, one JSON object per line, as Hugging Face's `imagefolder` reads it:
  {"file_name": "sub/cat.png", "text": "a cat"} (file_name relative to the folder). Two optional fields,
  written by `sdxl.training.shapes.write_dataset`, describe how the file itself was made, so that the
  micro-conditioning describes the true original rather than the file:
    "original_size": [h, w]   the size of the original image before any resizing (it replaces the file's size);
    "crop_top_left": [top, left]   where the file was cropped from that original (in its pixel coordinates).
  The data set's own resize (by a factor s) and crop (t, l) then compose: crop = (round(s top) + t, round(s left) + l).
  Files a metadata.jsonl names must exist; other image files need a sidecar caption.

Images without any caption raise ValueError (naming them) unless `allow_missing_captions=True`, which trains
them with the empty caption and logs a warning: silently training uncaptioned images is a common mistake.
Every image is decoded once when the folder is scanned, so that a truncated or corrupt file is found before
training starts: a DataError naming the files, unless `skip_unreadable=True`, which leaves them out with a
warning and lists them in `skipped`. A file that becomes unreadable later raises DataError when it is read.
Captions and metadata.jsonl are UTF-8 (a byte-order mark is allowed); anything else is a DataError naming the file.

Conditioning values follow the SDXL paper (Podell et al. 2023, sec. 2.2): c_size = original (h, w) before any
resizing; c_crop = (c_top, c_left), the pixels cropped off the top-left of the resized image; and the target
size = the bucket's (h, w). Multi-aspect training (sec. 2.3): each image goes to the bucket with the nearest
aspect ratio and every batch comes from a single bucket.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..images import load_image
from ..options import SDXL_BUCKETS  # the one table of SDXL's paper buckets; also importable from here

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Buckets.


def buckets(resolution: int = 1024, multiple: int = 64) -> list[tuple[int, int]]:
    """SDXL's bucket shapes (width, height) scaled to area ~resolution^2, sides multiples of `multiple` (SDXL sec. 2.3).

    resolution=1024, multiple=64 gives SDXL_BUCKETS itself; small models use multiple=8 (the VAE's factor), e.g.
    resolution=64 gives 64x64, 56x72, ..., 32x128. Shapes that round to the same size are listed once.
    """
    if resolution <= 0 or multiple <= 0:
        raise ValueError(f"resolution and multiple must be positive, got {resolution} and {multiple}")
    if resolution < multiple:
        raise ValueError(f"resolution {resolution} is smaller than the bucket multiple {multiple}")
    s = resolution / 1024
    out: list[tuple[int, int]] = []
    for w0, h0 in SDXL_BUCKETS:
        tw, th = w0 * s, h0 * s
        # Of the four floor/ceil roundings, keep the one closest in aspect ratio and area (log errors), so the
        # small lists stay ~resolution^2 in area instead of drifting as plain rounding of both sides would.
        cands = {
            (max(multiple, f(tw / multiple) * multiple), max(multiple, g(th / multiple) * multiple))
            for f in (math.floor, math.ceil)
            for g in (math.floor, math.ceil)
        }

        def err(c: tuple[int, int]) -> tuple[float, tuple[int, int]]:
            w, h = c
            return abs(math.log((w / h) / (tw / th))) + abs(math.log((w * h) / (tw * th))), c

        best = min(cands, key=err)
        if best not in out:
            out.append(best)
    return out


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (width, height) whose aspect ratio is closest to width/height (in log ratio; SDXL sec. 2.3)."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    a = math.log(width / height)
    # Ties (equal ratio) go to the bucket closest in area, so little cropping or scaling is done.
    return min(
        buckets,
        key=lambda b: (abs(math.log(b[0] / b[1]) - a), abs(math.log(b[0] * b[1] / (width * height)))),
    )


def fit_bucket(im: Image.Image, bucket: tuple[int, int], rng: random.Random | None
               ) -> tuple[Image.Image, float, tuple[int, int], tuple[int, int]]:
    """Resize `im` to cover the bucket (width, height) keeping its aspect ratio, and crop the bucket out of it
    (SDXL sec. 2.3): a random window drawn from `rng`, or the centre one without. Returns (the crop, the scale s,
    the resized (width, height), the crop's (top, left) in the resized image: c_crop)."""
    w, h = im.size
    bw, bh = bucket
    s = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    if (rw, rh) != (w, h):
        im = im.resize((rw, rh), resample=Image.Resampling.LANCZOS)
    if rng is not None:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return im.crop((left, top, left + bw, top + bh)), s, (rw, rh), (top, left)


def to_tensor(im: Image.Image) -> Tensor:
    """(3, H, W) float32 in [-1, 1] of an 8-bit RGB image: what the VAE encodes."""
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Examples and the data set.


@dataclass
class Example:
    """One training example with SDXL's micro-conditioning (SDXL paper sec. 2.2)."""

    image: Tensor  # (3, H, W) float32 in [-1, 1], H x W = the bucket
    caption: str
    original_size: tuple[int, int]  # (h, w) of the original before any resizing: c_size
    crop_top_left: tuple[int, int]  # (top, left) cropped off the resized image: c_crop
    target_size: tuple[int, int]  # (h, w) of the bucket
    path: str
    view: str = ""  # the file, crop window and flip these pixels come from: the latent cache's key


class DataError(ValueError):
    """A training file (image, caption, metadata) that cannot be read; the message names it.

    Raised in a DataLoader worker, it reaches the main process re-created from a message that holds the worker's
    traceback: the original message (its last line) is kept, so that it still reads as one line."""

    def __init__(self, message: str):
        if message.startswith("Caught DataError"):
            message = message.strip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


def read_image(path: str | Path) -> Image.Image:
    """The decoded 8-bit RGB image of a file, read as the pipeline reads init images (sdxl.images.load_image:
    EXIF orientation applied, transparency over white, 16-bit greys scaled). DataError naming the file when it
    cannot be read (missing, truncated, corrupt, not an image, too many pixels)."""
    try:
        return load_image(path, what="")
    except (ValueError, OSError) as e:
        message = str(e)
        raise DataError(message if str(path) in message else f"{path}: cannot read image ({message})") from None


def read_text(path: str | Path) -> str:
    """A caption or metadata file as text: UTF-8 (a leading byte-order mark dropped); DataError naming the file."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}); "
                        "save it as UTF-8") from None


def _probe(path: Path) -> tuple[int, int] | DataError:
    """(width, height) of the decoded image, or the DataError that reading it raises."""
    try:
        return read_image(path).size
    except DataError as e:
        return e


def _pair(value, what: str, name: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"metadata.jsonl: {what} of {name!r} must be a pair of numbers, got {value!r}")
    return int(value[0]), int(value[1])


class ImageCaptionDataset(torch.utils.data.Dataset):
    """A folder of images with captions, bucketed by aspect ratio, with size / crop conditioning (SDXL sec. 2.2-2.3).

    Randomness (crop position, caption dropout, flip) is a function of (seed, epoch, index) only, so results do
    not depend on worker processes or access order; call set_epoch to vary it between epochs.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        resolution: int = 1024,
        bucket_multiple: int = 64,
        random_crop: bool = True,
        caption_dropout: float = 0.0,
        seed: int = 0,
        flip: bool = False,
        allow_missing_captions: bool = False,
        skip_unreadable: bool = False,
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder}: not a folder")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.random_crop = random_crop
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.flip = flip
        self.epoch = 0
        self.buckets = buckets(resolution, bucket_multiple)

        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.sizes: list[tuple[int, int]] = []  # file (width, height), EXIF orientation applied
        self.original_sizes: list[tuple[int, int] | None] = []  # metadata overrides, (h, w)
        self.source_crops: list[tuple[int, int]] = []  # metadata crop of the file from its original
        self.bucket_of: list[tuple[int, int]] = []  # (width, height) per index
        self.skipped: list[tuple[str, str]] = []  # (file relative to the folder, why) of unreadable images left out
        meta = self._read_metadata()
        files = self._image_files()
        missing: list[str] = []
        for p, size in zip(files, self._verified_sizes(files, skip_unreadable)):
            rel = p.relative_to(self.folder).as_posix()
            if size is not None and not self._add(p, rel, meta.get(rel, {}), size):
                missing.append(rel)
        if missing:
            self._report_missing_captions(missing, allow_missing_captions)
        if not self.paths:
            raise DataError(f"{self.folder}: no readable image left ({len(self.skipped)} unreadable skipped)")

    def _image_files(self) -> list[Path]:
        """Every image under the folder, sorted (so indices are the same on every run and rank)."""
        files = sorted(
            p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"{self.folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return files

    def _verified_sizes(self, files: list[Path], skip: bool) -> list[tuple[int, int] | None]:
        """Each file decoded once (in threads: PIL decodes without the GIL): its (width, height), or None for an
        unreadable one that `skip` leaves out (listed in self.skipped, with a warning); without `skip`, DataError."""
        workers = min(8, os.cpu_count() or 1, len(files))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            probed = list(pool.map(_probe, files))
        bad = [(p.relative_to(self.folder).as_posix(), str(r).removeprefix(f"{p}: "))
               for p, r in zip(files, probed) if isinstance(r, DataError)]
        if bad:
            shown = "; ".join(f"{rel} ({why})" for rel, why in bad[:5])
            shown += f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
            if not skip:
                raise DataError(f"{self.folder}: {len(bad)} unreadable image(s): {shown}. Fix or remove them, or set "
                                "skip_unreadable_images = true to train without them")
            log.warning("%s: skipping %d unreadable image(s): %s", self.folder, len(bad), shown)
            self.skipped = bad
        return [None if isinstance(r, DataError) else r for r in probed]

    def _add(self, p: Path, rel: str, entry: dict, size: tuple[int, int]) -> bool:
        """Index one image of (width, height) `size` (its metadata.jsonl `entry` or {}); False when it has no
        caption (it gets "")."""
        has_caption = True
        if "text" in entry:
            text = str(entry["text"])
        elif p.with_suffix(".txt").is_file():
            text = read_text(p.with_suffix(".txt")).strip()
        else:
            has_caption, text = False, ""
        self.paths.append(p)
        self.captions.append(text)
        self.sizes.append(size)
        self.original_sizes.append(
            _pair(entry["original_size"], "original_size", rel) if "original_size" in entry else None
        )
        self.source_crops.append(
            _pair(entry["crop_top_left"], "crop_top_left", rel) if "crop_top_left" in entry else (0, 0)
        )
        self.bucket_of.append(nearest_bucket(size[0], size[1], self.buckets))
        return has_caption

    def _report_missing_captions(self, missing: list[str], allow: bool) -> None:
        """ValueError naming the uncaptioned images; with `allow`, a warning (silently empty captions are a trap)."""
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        if not allow:
            raise ValueError(
                f"{self.folder}: no caption for {shown} (add a sidecar .txt or a metadata.jsonl entry, "
                "or set allow_missing_captions = true to train them with an empty caption)"
            )
        log.warning("%s: no caption for %s; training with an empty caption", self.folder, shown)

    def _read_metadata(self) -> dict[str, dict]:
        path = self.folder / "metadata.jsonl"
        if not path.is_file():
            return {}
        meta: dict[str, dict] = {}
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(entry, dict) or "file_name" not in entry:
                raise ValueError(f"{path}:{n}: each line needs a \"file_name\"")
            name = Path(entry["file_name"]).as_posix()
            if not (self.folder / name).is_file():
                raise ValueError(f"{path}:{n}: {name!r} does not exist")
            meta[name] = entry
        return meta

    def set_epoch(self, epoch: int) -> None:
        """Vary crops, flips and caption dropout per epoch (deterministically)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Example:
        path = self.paths[i]
        # A string seed is hashed with SHA-512 by `random`, so it is the same in every process (unlike hash()).
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        im = read_image(path)  # DataError naming the file if it became unreadable since the scan
        w, h = im.size
        bw, bh = self.bucket_of[i]
        im, s, (rw, _), (top, left) = fit_bucket(im, (bw, bh), rng if self.random_crop else None)
        flipped = self.flip and rng.random() < 0.5
        if flipped:
            # Mirroring the crop window too: the crop is then `left` pixels from the flipped image's left edge
            # counted from the other side.
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = rw - bw - left

        original = self.original_sizes[i]
        source_top, source_left = self.source_crops[i]
        if flipped and original is not None and source_left + w <= original[1]:
            # The file is a crop of its original at the original's scale: that crop window mirrors as well.
            # (A file that is a resize of a whole, smaller original keeps its (0, 0).)
            source_left = original[1] - source_left - w
        caption = "" if rng.random() < self.caption_dropout else self.captions[i]
        return Example(
            image=to_tensor(im),
            caption=caption,
            original_size=original if original is not None else (h, w),
            crop_top_left=(round(source_top * s) + top, round(source_left * s) + left),
            target_size=(bh, bw),
            path=str(path),
            view=f"{path}|{bw}x{bh}|{top},{left}|{'flip' if flipped else ''}",
        )


# ---------------------------------------------------------------------------------------------
# Batching.


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices that share a bucket, shuffled per epoch, sharded across DDP ranks (SDXL sec. 2.3).

    Every rank builds the same global list of batches from (seed, epoch) and takes batches rank, rank + world_size,
    ... so ranks get disjoint batches and the same number of steps (DDP needs that). As torch's
    DistributedSampler does, drop_last=False pads the list with batches from its start so it divides by
    world_size (every index is seen; a few twice), and drop_last=True drops incomplete batches and truncates.
    """

    def __init__(
        self,
        bucket_of: ImageCaptionDataset | Sequence[tuple[int, int]],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.bucket_of = list(bucket_of.bucket_of if isinstance(bucket_of, ImageCaptionDataset) else bucket_of)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            self.groups.setdefault(tuple(b), []).append(i)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another epoch (the same on every rank)."""
        self.epoch = epoch

    def _bucket_counts(self, limit: int = 8) -> str:
        """'WxH: n' per bucket, the fullest first (at most `limit` of them)."""
        counts = sorted(((len(i), b) for b, i in self.groups.items()), key=lambda c: (-c[0], c[1]))
        text = ", ".join(f"{w}x{h}: {n}" for n, (w, h) in counts[:limit])
        return text + (f" and {len(counts) - limit} more" if len(counts) > limit else "")

    def shortfall(self) -> str:
        """Why drop_last batching gives no batch, naming batch_size and, when they are what is too small, the
        buckets with their image counts."""
        n, b, w = len(self.bucket_of), self.batch_size, self.world_size
        processes = f" x {w} processes" if w > 1 else ""
        if n < b * w:
            return f"{n} image(s), fewer than batch_size = {b}{processes}"
        full = sum(len(i) // b for i in self.groups.values())
        if full == 0:
            return (f"{n} images, but a batch comes from one aspect-ratio bucket and no bucket holds batch_size = {b} "
                    f"of them (images per bucket {self._bucket_counts()}): lower batch_size, or add images of "
                    "those aspect ratios")
        return (f"the aspect-ratio buckets ({self._bucket_counts()}) make {full} full batch(es) of batch_size = {b}, "
                f"fewer than the {w} processes: lower batch_size")

    def small_buckets(self) -> dict[tuple[int, int], int]:
        """Buckets with fewer images than batch_size, and how many: with drop_last their images are never trained."""
        return {k: len(i) for k, i in sorted(self.groups.items()) if len(i) < self.batch_size}

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches: list[list[int]] = []
        for key in sorted(self.groups):  # sorted: the same order on every rank
            idx = list(self.groups[key])
            if self.shuffle:
                rng.shuffle(idx)
            for k in range(0, len(idx), self.batch_size):
                batch = idx[k : k + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        n = len(batches)
        if self.drop_last:
            batches = batches[: n - n % self.world_size]
        elif n % self.world_size and n:
            pad = self.world_size - n % self.world_size
            batches += [batches[k % n] for k in range(pad)]
        return batches

    def __iter__(self):
        yield from self._all_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = 0
        for idx in self.groups.values():
            n += len(idx) // self.batch_size if self.drop_last else math.ceil(len(idx) / self.batch_size)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)


def collate(examples: list[Example]) -> dict:
    """Stack examples of one bucket: images (B, 3, H, W); size / crop / target conditioning (B, 2) float32."""
    if not examples:
        raise ValueError("collate: empty batch")
    shapes = {tuple(e.image.shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"collate: images of different shapes {sorted(shapes)}; batch from one bucket (BucketBatchSampler)"
        )
    return {
        "images": torch.stack([e.image for e in examples]),
        "captions": [e.caption for e in examples],
        "original_size": torch.tensor([e.original_size for e in examples], dtype=torch.float32),
        "crop_top_left": torch.tensor([e.crop_top_left for e in examples], dtype=torch.float32),
        "target_size": torch.tensor([e.target_size for e in examples], dtype=torch.float32),
        "paths": [e.path for e in examples],
        "views": [e.view for e in examples],
    }
