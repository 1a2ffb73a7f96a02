"""Preference pairs for Diffusion-DPO (`objective = "dpo"`, docs/dpo.md): (prompt, preferred image, rejected image).

Two layouts, named by the config's `data`:
- a folder with `pairs.jsonl`, one JSON object per line,
      {"prompt": "a red circle", "chosen": "good/001.png", "rejected": "bad/001.png"}
  with image paths relative to the folder (never outside it: absolute paths, `..` and links that lead out are
  refused). Every image is decoded once when the file is read, as `data.ImageCaptionDataset` does.
- Pick-a-Pic (Kirstain et al. 2023), the data set of the Diffusion-DPO paper: a .parquet file, or a folder of them
  (searched recursively), with the columns `caption`, `jpg_0`, `jpg_1` (encoded image bytes) and `label_0`
  (1: jpg_0 is preferred, 0: jpg_1 is, 0.5: a tie, left out as the paper's code does). Needs pyarrow. Only the
  headers of the images are read when scanning (the sizes, for the buckets); rows are read again, a row group at a
  time, when a batch needs them.

Each pair goes to the aspect-ratio bucket nearest to its images' mean aspect ratio; both images are resized to
cover it and cropped to it (`data.fit_bucket`), each with its own micro-conditioning: its original size and its
crop (SDXL sec. 2.2). A batch of B pairs (`collate_pairs`) holds images (2B, 3, H, W), the B preferred first,
then the B rejected; B captions; size / crop / target conditioning (2B, 2); 2B views (the latent cache's keys).

A row that cannot be used is a one-line ValueError naming the file, the line (JSONL, from 1) or row (parquet, from
0), and the field. An unreadable image is a DataError, or with skip_unreadable its pair is left out (listed in
`skipped`).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch
from PIL import Image

from ..images import load_image
from .config import TrainConfig
from .data import (
    BucketBatchSampler,
    DataError,
    Example,
    _probe,
    buckets,
    collate,
    fit_bucket,
    nearest_bucket,
    read_image,
    read_text,
    to_tensor,
)

PAIRS_FILE = "pairs.jsonl"
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
Size = tuple[int, int]  # (width, height)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Pick-a-Pic parquet files needs pyarrow: pip install pyarrow") from None
    return pq


# ---------------------------------------------------------------------------------------------
# Sources: prompts, two image names and sizes per pair, and the pair's two decoded images.


class JsonlPairs:
    """A folder with pairs.jsonl: image files relative to the folder."""

    def __init__(self, folder: Path, skip_unreadable: bool):
        self.folder, self.path = folder, folder / PAIRS_FILE
        self.prompts: list[str] = []
        self.files: list[tuple[Path, Path]] = []
        self.names: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str]] = []  # (where, why) of pairs left out with an unreadable image
        self.ties = 0
        rows = self._rows()
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            probed = list(pool.map(_probe, [f for _, _, pair in rows for f in pair]))
        self.sizes: list[tuple[Size, Size]] = []
        bad = []
        for k, (where, prompt, pair) in enumerate(rows):
            w, r = probed[2 * k], probed[2 * k + 1]
            errors = [e for e in (w, r) if isinstance(e, DataError)]
            if errors:
                bad.append((where, str(errors[0]).removeprefix(f"{self.folder}/")))
                continue
            self.prompts.append(prompt)
            self.files.append(pair)
            self.names.append(tuple(p.relative_to(self.folder).as_posix() for p in pair))
            self.sizes.append((w, r))
        if bad and not skip_unreadable:
            shown = "; ".join(f"{where}: {why}" for where, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
            raise DataError(f"{self.path}: {len(bad)} pair(s) with an unreadable image: {shown}. Fix or remove them, "
                            "or set skip_unreadable_images = true to train without them")
        self.skipped = bad

    def _rows(self) -> list[tuple[str, str, tuple[Path, Path]]]:
        """(where, prompt, (chosen, rejected)) of each line; ValueError naming the line and field of a bad one."""
        rows = []
        for n, line in enumerate(read_text(self.path).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.path}:{n}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: each line must be a JSON object with \"prompt\", \"chosen\", "  # noqa: TRY004
                                 "\"rejected\"")
            if not isinstance(entry.get("prompt"), str):
                raise ValueError(f"{where}: \"prompt\" must be a string, got {entry.get('prompt')!r}")  # noqa: TRY004
            pair = (self._file(where, entry, "chosen"), self._file(where, entry, "rejected"))
            if pair[0] == pair[1]:
                raise ValueError(f"{where}: \"chosen\" and \"rejected\" are the same file {entry['chosen']!r}")
            rows.append((where, entry["prompt"], pair))
        if not rows:
            raise ValueError(f"{self.path}: no pairs")
        return rows

    def _file(self, where: str, entry: dict, field: str) -> Path:
        name = entry.get(field)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: \"{field}\" must be an image file name, got {name!r}")
        posix = PurePosixPath(name.replace("\\", "/"))
        root = self.folder.resolve()
        path = self.folder / posix
        if posix.is_absolute() or Path(name).is_absolute() or ".." in posix.parts or \
                not path.resolve().is_relative_to(root):
            raise ValueError(f"{where}: \"{field}\" must be a path inside {self.folder}, got {name!r}")
        if not path.is_file():
            raise ValueError(f"{where}: \"{field}\": {name!r} does not exist in {self.folder}")
        return path

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        return read_image(self.files[i][0]), read_image(self.files[i][1])


class ParquetPairs:
    """Pick-a-Pic parquet files: rows (caption, jpg_0, jpg_1, label_0), ties left out."""

    def __init__(self, files: list[Path], skip_unreadable: bool):
        pq = _pyarrow()
        self.files = files
        self.prompts: list[str] = []
        self.rows: list[tuple[int, int, int, str, str]] = []  # (file, row group, row in group, chosen, rejected)
        self.names: list[tuple[str, str]] = []
        self.sizes: list[tuple[Size, Size]] = []
        self.skipped: list[tuple[str, str]] = []
        self.ties = 0
        self._cache: dict[tuple[int, int], dict] = {}  # the last row group read
        for f, path in enumerate(files):
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 (pyarrow raises its own kinds for damaged files)
                raise ValueError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
            missing = [c for c in PICKAPIC_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: no column(s) {', '.join(missing)}; Pick-a-Pic pairs need "
                                 f"{', '.join(PICKAPIC_COLUMNS)}")
            start = 0
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=list(PICKAPIC_COLUMNS)).to_pydict()
                for r in range(len(table["caption"])):
                    self._add(f, g, r, start + r, {c: table[c][r] for c in PICKAPIC_COLUMNS}, skip_unreadable)
                start += len(table["caption"])
        if not self.prompts:
            raise ValueError(f"{files[0] if len(files) == 1 else files[0].parent}: no pairs with a preference "
                             f"({self.ties} ties left out)")

    def _add(self, f: int, g: int, r: int, n: int, row: dict, skip_unreadable: bool) -> None:
        where = f"{self.files[f]}: row {n}"
        label = row["label_0"]
        if label == 0.5:
            self.ties += 1
            return
        if label not in (0, 1) or isinstance(label, bool):
            raise ValueError(f"{where}: label_0 must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (a tie), "
                             f"got {label!r}")
        if not isinstance(row["caption"], str):
            raise ValueError(f"{where}: caption must be a string, got {row['caption']!r}")  # noqa: TRY004
        chosen, rejected = ("jpg_0", "jpg_1") if label == 1 else ("jpg_1", "jpg_0")
        sizes = []
        for column in (chosen, rejected):
            size = _header_size(row[column], f"{where}: {column}")
            if isinstance(size, DataError):
                if not skip_unreadable:
                    raise size
                self.skipped.append((f"{self.files[f].name}: row {n}", f"{column}: {str(size).split(': ')[-1]}"))
                return
            sizes.append(size)
        self.prompts.append(row["caption"])
        self.rows.append((f, g, r, chosen, rejected))
        self.names.append((f"{self.files[f]}#{n}:{chosen}", f"{self.files[f]}#{n}:{rejected}"))
        self.sizes.append((sizes[0], sizes[1]))

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        f, g, r, chosen, rejected = self.rows[i]
        if (f, g) not in self._cache:
            table = _pyarrow().ParquetFile(self.files[f]).read_row_group(g, columns=[*PICKAPIC_COLUMNS[1:3]])
            self._cache = {(f, g): table.to_pydict()}  # (one row group: shuffled batches rarely share one)
        table = self._cache[(f, g)]
        out = []
        for column, name in zip((chosen, rejected), self.names[i]):
            try:
                out.append(load_image(table[column][r], what=name))
            except ValueError as e:
                raise DataError(str(e)) from None
        return out[0], out[1]


def _header_size(data, where: str) -> Size | DataError:
    """(width, height) from an encoded image's header, turned by its EXIF orientation; the DataError if it is none."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        return DataError(f"{where}: no image bytes (got {type(data).__name__})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    except Exception as e:  # noqa: BLE001 (PIL raises many kinds for data that is not an image)
        return DataError(f"{where}: not an image ({type(e).__name__})")
    return (h, w) if turned else (w, h)


def open_source(data: str | Path, skip_unreadable: bool = False) -> JsonlPairs | ParquetPairs:
    """The pairs `data` names: a folder with pairs.jsonl, a .parquet file, or a folder of .parquet files."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() == ".parquet":
        return ParquetPairs([path], skip_unreadable)
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder" if not path.exists() else
                         f"{path}: pairs are a folder with {PAIRS_FILE}, or .parquet files")
    if (path / PAIRS_FILE).is_file():
        return JsonlPairs(path, skip_unreadable)
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise ValueError(f"{path}: no {PAIRS_FILE} (lines {{\"prompt\", \"chosen\", \"rejected\"}}) and no .parquet "
                         "files (Pick-a-Pic) in it")
    return ParquetPairs(files, skip_unreadable)


# ---------------------------------------------------------------------------------------------
# The data set and its batches.


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs, bucketed by aspect ratio; item i is (preferred, rejected) as two `data.Example`s.

    Randomness (crops, caption dropout) is a function of (seed, epoch, index) only, as in ImageCaptionDataset."""

    def __init__(self, data: str | Path, *, resolution: int = 1024, bucket_multiple: int = 64,
                 random_crop: bool = False, caption_dropout: float = 0.0, seed: int = 0,
                 skip_unreadable: bool = False) -> None:
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.source = open_source(data, skip_unreadable)
        self.random_crop, self.caption_dropout, self.seed, self.epoch = random_crop, caption_dropout, seed, 0
        self.buckets = buckets(resolution, bucket_multiple)
        # The bucket of the pair's geometric-mean size: both images share it (a batch is one tensor).
        self.bucket_of = [nearest_bucket(round(math.sqrt(a[0] * b[0])), round(math.sqrt(a[1] * b[1])), self.buckets)
                          for a, b in self.source.sizes]
        self.skipped = self.source.skipped

    @property
    def counted(self) -> str:
        """How many pairs, in words (log.txt)."""
        ties = f" ({self.source.ties} ties left out)" if self.source.ties else ""
        return f"{len(self)} preference pairs{ties}"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source.prompts)

    def __getitem__(self, i: int) -> tuple[Example, Example]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        bw, bh = self.bucket_of[i]
        views = []
        for im, name in zip(self.source.images(i), self.source.names[i]):
            w, h = im.size
            crop, _, _, (top, left) = fit_bucket(im, (bw, bh), rng if self.random_crop else None)
            views.append((crop, (h, w), (top, left), name))
        caption = "" if rng.random() < self.caption_dropout else self.source.prompts[i]
        chosen, rejected = (
            Example(image=to_tensor(crop), caption=caption, original_size=size, crop_top_left=at,
                    target_size=(bh, bw), path=name, view=f"{name}|{bw}x{bh}|{at[0]},{at[1]}|")
            for crop, size, at, name in views
        )
        return chosen, rejected


def collate_pairs(pairs: list[tuple[Example, Example]]) -> dict:
    """B pairs of one bucket -> `data.collate` of the B preferred then the B rejected images, with B captions."""
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs])
    batch["captions"] = batch["captions"][:len(pairs)]
    return batch


def pair_loader(cfg: TrainConfig, rank: int, world: int) -> tuple[PairDataset, BucketBatchSampler, Callable]:
    """The trainer's loader for objective = "dpo": (data set, bucket batch sampler, collate)."""
    ds = PairDataset(cfg.data, resolution=cfg.resolution, bucket_multiple=cfg.bucket_multiple,
                     random_crop=cfg.random_crop, caption_dropout=cfg.caption_dropout, seed=cfg.seed,
                     skip_unreadable=cfg.skip_unreadable_images)
    sampler = BucketBatchSampler(ds.bucket_of, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                                 drop_last=True)
    if len(sampler) == 0:
        raise ValueError(f"{cfg.data}: the pairs give no batch: {sampler.shortfall()}")
    return ds, sampler, collate_pairs
