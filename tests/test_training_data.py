"""Training data: SDXL's aspect buckets, the image-caption folder data set, bucket batching and the shapes set.

Expected crops, sizes and pixels are computed here independently (PIL resize + numpy slicing) and compared with
what the data set returns; the shapes tests check that `measure` recovers what `render` drew, since `measure`
later judges the trained model's samples.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.training import shapes as S
from sdxl.training.data import (
    SDXL_BUCKETS,
    BucketBatchSampler,
    DataError,
    Example,
    ImageCaptionDataset,
    buckets,
    collate,
    nearest_bucket,
)

# ---------------------------------------------------------------------------------------------
# Buckets.


def test_sdxl_bucket_list_is_the_papers():
    assert len(SDXL_BUCKETS) == 40 and len(set(SDXL_BUCKETS)) == 40
    for w, h in SDXL_BUCKETS:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.9 <= w * h / 1024**2 <= 1.0 + 1e-9
    ratios = sorted(w / h for w, h in SDXL_BUCKETS)
    assert ratios[0] == 0.25 and ratios[-1] == 4.0
    # A few entries as SDXL's (width, height) (the familiar 1216x832 / 832x1216 landscape / portrait pair).
    for b in [(1024, 1024), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (2048, 512), (512, 2048)]:
        assert b in SDXL_BUCKETS
    assert buckets(1024, 64) == list(SDXL_BUCKETS)


@pytest.mark.parametrize("resolution,multiple", [(64, 8), (128, 8), (256, 8), (512, 64)])
def test_scaled_buckets(resolution, multiple):
    bs = buckets(resolution, multiple)
    assert len(bs) == len(set(bs)) >= 15
    assert (resolution, resolution) in bs
    for w, h in bs:
        assert w % multiple == 0 and h % multiple == 0
        assert 0.85 <= w * h / resolution**2 <= 1.15, (w, h)
    # Coverage: every SDXL aspect ratio has a scaled bucket within 15 % of it, including the 1:4 and 4:1 ends.
    for W, H in SDXL_BUCKETS:
        assert min(abs(math.log((w / h) / (W / H))) for w, h in bs) < math.log(1.15), (W, H)


def test_nearest_bucket():
    assert nearest_bucket(1920, 1080, SDXL_BUCKETS) == (1344, 768)
    assert nearest_bucket(1000, 1000, SDXL_BUCKETS) == (1024, 1024)
    assert nearest_bucket(300, 1200, SDXL_BUCKETS) == (512, 2048)
    assert nearest_bucket(5000, 100, SDXL_BUCKETS) == (2048, 512)
    # Brute force on the small list: the chosen bucket's ratio is (one of) the closest.
    bs = buckets(64, 8)
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(10, 3000), rng.randint(10, 3000)
        bw, bh = nearest_bucket(w, h, bs)
        best = min(abs(math.log((x / y) / (w / h))) for x, y in bs)
        assert abs(math.log((bw / bh) / (w / h))) == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError):
        nearest_bucket(10, 10, [])


# ---------------------------------------------------------------------------------------------
# The data set.


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


SIZES = [(300, 100), (100, 300), (120, 120), (150, 100), (100, 150), (200, 100), (130, 120)]


def _folder(tmp_path, sizes=SIZES, copies=3, mode="sidecar"):
    meta = []
    for k in range(copies):
        for j, (w, h) in enumerate(sizes):
            name = f"img_{k}_{j}.png"
            _noise(w, h, 100 * k + j).save(tmp_path / name)
            text = f"caption {k} {j}"
            if mode == "sidecar":
                (tmp_path / name).with_suffix(".txt").write_text(text + "\n")
            else:
                meta.append({"file_name": name, "text": text})
    if meta:
        (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    return tmp_path


def _expected(path, bucket, top=None, left=None, flip=False):
    """Independent reference: resize to cover the bucket, (flip,) crop; returns (tensor, top, left)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    bw, bh = bucket
    s = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    a = np.asarray(im.resize((rw, rh), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1
    if flip:
        a = a[:, ::-1]
    top = (rh - bh) // 2 if top is None else top
    left = (rw - bw) // 2 if left is None else left
    return torch.from_numpy(a[top : top + bh, left : left + bw].copy()).permute(2, 0, 1), (rh, rw)


@pytest.mark.parametrize("mode", ["sidecar", "metadata"])
def test_dataset_centre_crop_known_image(tmp_path, mode):
    folder = _folder(tmp_path, copies=1, mode=mode)
    ds = ImageCaptionDataset(folder, resolution=64, bucket_multiple=8, random_crop=False)
    assert len(ds) == len(SIZES)
    i = [p.name for p in ds.paths].index("img_0_0.png")  # 300 x 100
    # 3:1 is closest to 112x40 (2.8) in the 64-px list (next: 120x32 = 3.75): log distances 0.069 vs 0.223.
    assert ds.bucket_of[i] == (112, 40)
    ex = ds[i]
    assert isinstance(ex, Example)
    assert ex.caption == "caption 0 0"
    assert ex.original_size == (100, 300)
    assert ex.target_size == (40, 112)
    # Scale max(112/300, 40/100) = 0.4 -> 120 x 40; centre crop: left (120 - 112) // 2 = 4, top 0.
    assert ex.crop_top_left == (0, 4)
    ref, _ = _expected(ds.paths[i], (112, 40))
    assert ex.image.shape == (3, 40, 112) and ex.image.dtype == torch.float32
    torch.testing.assert_close(ex.image, ref, atol=1e-6, rtol=0)
    assert ex.image.min() >= -1 and ex.image.max() <= 1
    # Portrait: 100 x 300 -> 40 x 112 bucket, crop from the top instead.
    j = [p.name for p in ds.paths].index("img_0_1.png")
    assert ds.bucket_of[j] == (40, 112) and ds[j].crop_top_left == (4, 0)


def test_random_crop_is_consistent_seeded_and_varies(tmp_path):
    folder = _folder(tmp_path, copies=1)
    ds = ImageCaptionDataset(folder, resolution=64, bucket_multiple=8, random_crop=True, seed=1)
    i = [p.name for p in ds.paths].index("img_0_0.png")
    lefts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        ex = ds[i]
        top, left = ex.crop_top_left
        assert top == 0 and 0 <= left <= 8
        ref, _ = _expected(ds.paths[i], (112, 40), top, left)
        torch.testing.assert_close(ex.image, ref, atol=1e-6, rtol=0)
        lefts.add(left)
    assert len(lefts) >= 3  # not always the centre
    # Seeded: the same seed and epoch give the same crops; another seed gives others.
    again = ImageCaptionDataset(folder, resolution=64, bucket_multiple=8, random_crop=True, seed=1)
    other = ImageCaptionDataset(folder, resolution=64, bucket_multiple=8, random_crop=True, seed=2)
    crops = lambda d: [d[k].crop_top_left for k in range(len(d))]  # noqa: E731
    ds.set_epoch(0)
    assert crops(ds) == crops(again)
    torch.testing.assert_close(ds[i].image, again[i].image)
    assert crops(ds) != crops(other)


def test_flip_mirrors_image_and_crop(tmp_path):
    ds = ImageCaptionDataset(_folder(tmp_path, copies=1), resolution=64, bucket_multiple=8, flip=True, seed=0)
    i = [p.name for p in ds.paths].index("img_0_0.png")
    seen = set()
    for epoch in range(16):
        ds.set_epoch(epoch)
        ex = ds[i]
        top, left = ex.crop_top_left
        plain, _ = _expected(ds.paths[i], (112, 40), top, left)
        flipped, _ = _expected(ds.paths[i], (112, 40), top, left, flip=True)
        if torch.allclose(ex.image, plain, atol=1e-6):
            seen.add("plain")
        else:
            torch.testing.assert_close(ex.image, flipped, atol=1e-6, rtol=0)
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_caption_dropout_rate(tmp_path):
    folder = _folder(tmp_path, sizes=[(16, 16)], copies=4)
    ds = ImageCaptionDataset(folder, resolution=16, bucket_multiple=8, caption_dropout=0.3)
    empty = total = 0
    for epoch in range(100):
        ds.set_epoch(epoch)
        for k in range(len(ds)):
            c = ds[k].caption
            assert c in ("", ds.captions[k])
            empty += c == ""
            total += 1
    assert 0.24 <= empty / total <= 0.36  # 400 draws: sd ~0.023
    ds0 = ImageCaptionDataset(tmp_path, resolution=16, bucket_multiple=8, caption_dropout=0.0)
    assert all(ds0[k].caption for k in range(len(ds0)))


def test_metadata_caption_and_conditioning_fields(tmp_path):
    _noise(64, 64, 0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sidecar loses")
    (tmp_path / "sub").mkdir()
    _noise(64, 48, 1).save(tmp_path / "sub" / "b.png")
    lines = [
        {"file_name": "a.png", "text": "metadata wins", "original_size": [200, 300], "crop_top_left": [10, 20]},
        {"file_name": "sub/b.png", "text": "in a subfolder"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8, random_crop=False)
    a = ds[[p.name for p in ds.paths].index("a.png")]
    assert a.caption == "metadata wins"
    assert a.original_size == (200, 300)  # the true original, not the file's 64 x 64
    assert a.target_size == (32, 32)
    assert a.crop_top_left == (5, 10)  # the file's crop (10, 20), scaled by the data set's resize 0.5, + (0, 0)
    b = ds[[p.name for p in ds.paths].index("b.png")]
    assert b.caption == "in a subfolder" and b.original_size == (48, 64)
    # Flipped, the file's window mirrors inside its original: left 300 - 20 - 64 = 216, scaled 0.5 -> 108.
    flipping = ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8, random_crop=False, flip=True)
    i = [p.name for p in flipping.paths].index("a.png")
    seen = set()
    for epoch in range(16):
        flipping.set_epoch(epoch)
        seen.add(flipping[i].crop_top_left)
    assert seen == {(5, 10), (5, 108)}


def test_errors(tmp_path, caplog):
    with pytest.raises(ValueError, match="no images"):
        ImageCaptionDataset(tmp_path)
    _noise(32, 32, 0).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(ValueError, match="broken.png"):
        ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8)
    (tmp_path / "broken.png").unlink()
    _noise(32, 32, 1).save(tmp_path / "nocaption.png")
    with pytest.raises(ValueError, match="nocaption.png"):
        ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8)
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8, allow_missing_captions=True)
    assert "nocaption.png" in caplog.text
    assert sorted(ds[k].caption for k in range(2)) == ["", "fine"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "t"}))
    with pytest.raises(ValueError, match="gone.png"):
        ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8)


def test_images_are_decoded_at_the_scan_and_unreadable_ones_named_or_skipped(tmp_path, caplog):
    for name in ("a", "b", "c"):
        _noise(40, 32, ord(name)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    whole = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(whole[: len(whole) // 2])  # a valid header: only decoding finds it
    with pytest.raises(DataError) as e:
        ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8)
    assert str(e.value).startswith(f"{tmp_path}: 1 unreadable image(s): b.png (")
    assert "skip_unreadable_images = true" in str(e.value)
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8, skip_unreadable=True)
    assert [p.name for p in ds.paths] == ["a.png", "c.png"] and ds.captions == ["a", "c"]
    assert [rel for rel, _ in ds.skipped] == ["b.png"] and "skipping 1 unreadable image(s): b.png" in caplog.text
    # A file spoiled after the scan: DataError naming it, one line also through a DataLoader worker process.
    (tmp_path / "c.png").write_bytes(b"gone bad")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=[1], num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    message = str(e.value)  # (the words are sdxl.images.load_image's)
    assert message.startswith(f"{tmp_path / 'c.png'}: ") and "\n" not in message and "Caught" not in message
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "c.png").unlink()
    with pytest.raises(DataError, match="no readable image left"):
        ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8, skip_unreadable=True)


def test_captions_are_utf8_with_or_without_a_byte_order_mark(tmp_path):
    _noise(32, 32, 0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffcaf\u00e9 au lait\n".encode("utf-8"))
    assert ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8).captions == ["caf\u00e9 au lait"]
    (tmp_path / "a.txt").write_bytes("caf\u00e9".encode("cp1252"))
    with pytest.raises(DataError) as e:
        ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8)
    assert str(e.value) == f"{tmp_path / 'a.txt'}: not UTF-8 text (byte 3: b'\\xe9'); save it as UTF-8"
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="metadata.jsonl: not UTF-8 text"):
        ImageCaptionDataset(tmp_path, resolution=32, bucket_multiple=8)


def test_no_batch_says_whether_images_or_buckets_are_too_few():
    one_each = [(32, 32), (48, 24), (24, 48), (32, 32)]
    assert BucketBatchSampler(one_each[:1], 2).shortfall() == "1 image(s), fewer than batch_size = 2"
    assert BucketBatchSampler(one_each, 4, world_size=2).shortfall() == (
        "4 image(s), fewer than batch_size = 4 x 2 processes")
    assert BucketBatchSampler(one_each, 3).shortfall() == (
        "4 images, but a batch comes from one aspect-ratio bucket and no bucket holds batch_size = 3 of them (images "
        "per bucket 32x32: 2, 24x48: 1, 48x24: 1): lower batch_size, or add images of those aspect ratios")
    assert BucketBatchSampler(one_each, 2, world_size=2, drop_last=True).shortfall() == (
        "the aspect-ratio buckets (32x32: 2, 24x48: 1, 48x24: 1) make 1 full batch(es) of batch_size = 2, fewer than "
        "the 2 processes: lower batch_size")
    assert len(BucketBatchSampler(one_each, 2, world_size=2, drop_last=True)) == 0
    assert BucketBatchSampler(one_each, 2).small_buckets() == {(24, 48): 1, (48, 24): 1}


# ---------------------------------------------------------------------------------------------
# Batching.


def test_batches_come_from_one_bucket_and_collate(tmp_path):
    ds = ImageCaptionDataset(_folder(tmp_path), resolution=64, bucket_multiple=8, seed=3)
    assert len(set(ds.bucket_of)) >= 4
    sampler = BucketBatchSampler(ds, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for b in batches:
        assert len({ds.bucket_of[i] for i in b}) == 1
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    for b, batch in zip(batches, loader):
        bw, bh = ds.bucket_of[b[0]]
        assert batch["images"].shape == (len(b), 3, bh, bw)
        assert batch["original_size"].shape == batch["crop_top_left"].shape == batch["target_size"].shape == (len(b), 2)
        assert batch["original_size"].dtype == torch.float32
        assert batch["target_size"].tolist() == [[bh, bw]] * len(b)
        assert batch["captions"] == [ds.captions[i] for i in b]
        assert batch["original_size"].tolist() == [[ds.sizes[i][1], ds.sizes[i][0]] for i in b]
    with pytest.raises(ValueError, match="shapes"):
        first = batches[0][0]
        other = next(i for i in range(len(ds)) if ds.bucket_of[i] != ds.bucket_of[first])
        collate([ds[first], ds[other]])


def test_sampler_shuffles_per_epoch_deterministically():
    bucket_of = [(64, 64)] * 20 + [(72, 56)] * 13
    s = BucketBatchSampler(bucket_of, 4, seed=0)
    e0 = list(s)
    assert list(BucketBatchSampler(bucket_of, 4, seed=0)) == e0
    s.set_epoch(1)
    assert list(s) != e0
    assert list(BucketBatchSampler(bucket_of, 4, seed=1)) != e0
    # Batches of different buckets are interleaved in a shuffled order, not bucket after bucket.
    firsts = set()
    for epoch in range(10):
        s.set_epoch(epoch)
        firsts.add(bucket_of[next(iter(s))[0]])
    assert len(firsts) == 2
    assert [b for b in BucketBatchSampler(bucket_of, 4, drop_last=True)] and all(
        len(b) == 4 for b in BucketBatchSampler(bucket_of, 4, drop_last=True)
    )
    assert len(BucketBatchSampler(bucket_of, 4, drop_last=True)) == 5 + 3
    ordered = list(BucketBatchSampler(bucket_of, 4, shuffle=False))
    assert ordered[0] == [0, 1, 2, 3]


def test_sampler_ddp_sharding():
    # 24 + 12 indices in batches of 4 -> 9 batches: 3 ranks get 3 each, disjoint and covering everything.
    bucket_of = [(64, 64)] * 24 + [(72, 56)] * 12
    shards = [list(BucketBatchSampler(bucket_of, 4, seed=5, rank=r, world_size=3)) for r in range(3)]
    flat = [i for sh in shards for b in sh for i in b]
    assert sorted(flat) == list(range(36))
    assert [len(sh) for sh in shards] == [3, 3, 3]
    # Uneven (11 batches on 4 ranks): padded to 12 so every rank takes the same number of steps; all covered.
    bucket_of = [(64, 64)] * 23 + [(72, 56)] * 18
    for drop_last in (False, True):
        shards = [
            list(BucketBatchSampler(bucket_of, 4, seed=5, rank=r, world_size=4, drop_last=drop_last)) for r in range(4)
        ]
        lens = [len(sh) for sh in shards]
        assert len(set(lens)) == 1
        assert lens[0] == len(BucketBatchSampler(bucket_of, 4, rank=0, world_size=4, drop_last=drop_last))
        flat = [i for sh in shards for b in sh for i in b]
        if drop_last:  # 5 + 4 full batches, truncated to 8: disjoint
            assert lens[0] == 2 and len(flat) == len(set(flat)) == 32
        else:
            assert lens[0] == 3 and set(flat) == set(range(41))
        for sh in shards:
            for b in sh:
                assert len({bucket_of[i] for i in b}) == 1
    with pytest.raises(ValueError):
        BucketBatchSampler(bucket_of, 4, rank=4, world_size=4)


# ---------------------------------------------------------------------------------------------
# The shapes data set.

TRIPLES = [(s, c, b) for s in S.SHAPES for c in S.COLOURS for b in S.COLOURS if c != b]


def test_caption_parse_round_trip():
    assert len(TRIPLES) == 3 * 8 * 7
    assert S.caption("circle", "red", "blue") == "a red circle on a blue background"
    for t in TRIPLES:
        assert S.parse_caption(S.caption(*t)) == t
        for size in S.SIZES:
            assert S.parse_caption(S.caption(*t, size=size)) == t
    assert S.parse_caption("A Red Circle on a blue background.") == ("circle", "red", "blue")
    for bad in ["", "a red circle", "a pink circle on a blue background", "a red hexagon on a blue background",
                "a huge red circle on a blue background", "the red circle on a blue background"]:
        assert S.parse_caption(bad) is None, bad
    with pytest.raises(ValueError):
        S.caption("circle", "pink", "blue")


def test_render_measure_recovers_every_combination():
    failures = []
    for k, (shape, colour, background) in enumerate(TRIPLES):
        m = S.measure(S.render(shape, colour, background, 64, 64, rng=random.Random(k)))
        if (m["shape"], m["colour"], m["background"], m["cut"]) != (shape, colour, background, False):
            failures.append(((shape, colour, background), m))
    assert not failures, failures[:3]
    # On the bucket shapes too (a wide and a tall one), and the fill ratios are near their ideals.
    for k, (w, h) in enumerate([(96, 40), (40, 96), (72, 56)]):
        for shape, ideal in [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)]:
            m = S.measure(S.render(shape, "white", "blue", w, h, rng=random.Random(k), scale=0.7))
            assert m["shape"] == shape and abs(m["fill_ratio"] - ideal) < 0.1


def test_small_upscaled_is_blurrier_and_crops_are_cut():
    rng = random.Random(0)
    native, small, crops, cut_native, cut_crop = [], [], [], 0, 0
    for _ in range(30):
        im, rec = S.make_example(rng, 64, 64, "native")
        m = S.measure(im)
        native.append(m["sharpness"])
        cut_native += m["cut"]
        im, rec = S.make_example(rng, 64, 64, "small")
        assert rec["original_size"][0] < 64 and rec["crop_top_left"] == [0, 0]
        small.append(S.measure(im)["sharpness"])
        im, rec = S.make_example(rng, 64, 64, "crop")
        m = S.measure(im)
        cut_crop += m["cut"]
        (oh, ow), (top, left) = rec["original_size"], rec["crop_top_left"]
        assert oh > 64 and ow > 64 and 0 <= top <= oh - 64 and 0 <= left <= ow - 64
        crops.append((top, left))
        assert (m["colour"], m["background"]) == (rec["colour"], rec["background"])  # the shape stays in view
    assert statistics.mean(small) < 0.6 * statistics.mean(native)
    assert max(small) < min(native)
    assert cut_native == 0 and cut_crop >= 10
    assert sum(t > 0 for t, _ in crops) >= 20 and sum(l > 0 for _, l in crops) >= 20  # real windows, not (0, 0)


def test_small_factor_sets_how_small_and_how_blurry():
    def small(factor):
        rng = random.Random(3)
        pairs = [S.make_example(rng, 64, 64, "small", factor) for _ in range(12)]
        return [rec["original_size"][0] for _, rec in pairs], statistics.mean(S.measure(im)["sharpness"] for im, _ in pairs)

    (mild_sizes, mild), (strong_sizes, strong) = small((2.0, 4.0)), small((6.0, 10.0))
    assert all(16 <= h <= 32 for h in mild_sizes) and all(6 <= h <= 11 for h in strong_sizes)
    assert strong < 0.7 * mild
    with pytest.raises(ValueError, match="small_factor"):
        S.write_dataset("unused", 1, small_factor=(4.0, 2.0))
    with pytest.raises(SystemExit):
        S.main(["unused", "--small-factor", "3"])


def test_write_dataset_is_honoured_by_the_dataset(tmp_path):
    S.write_dataset(tmp_path, 16, resolution=64, seed=0, small_fraction=0.3, crop_fraction=0.3)
    assert len(list(tmp_path.glob("*.png"))) == len(list(tmp_path.glob("*.txt"))) == 16
    meta = {m["file_name"]: m for m in map(json.loads, (tmp_path / "metadata.jsonl").read_text().splitlines())}
    assert len(meta) == 16 and {m["kind"] for m in meta.values()} == {"native", "small", "crop"}
    ds = ImageCaptionDataset(tmp_path, resolution=64, bucket_multiple=8, random_crop=False)
    allowed = set(buckets(64, 8))
    for k in range(len(ds)):
        ex, m = ds[k], meta[ds.paths[k].name]
        file = Image.open(ds.paths[k])
        assert file.size in allowed and ds.bucket_of[k] == file.size
        assert S.parse_caption(ex.caption) == (m["shape"], m["colour"], m["background"])
        assert (tmp_path / m["file_name"]).with_suffix(".txt").read_text().strip() == m["text"]
        assert ex.original_size == tuple(m["original_size"]) and ex.crop_top_left == tuple(m["crop_top_left"])
        assert ex.target_size == (file.size[1], file.size[0])
        pixels = ((ex.image.permute(1, 2, 0).numpy() + 1) * 127.5).round()
        assert np.array_equal(pixels, np.asarray(file.convert("RGB")))
    # Deterministic in the seed.
    S.write_dataset(tmp_path / "again", 16, resolution=64, seed=0, small_fraction=0.3, crop_fraction=0.3)
    assert (tmp_path / "again" / "metadata.jsonl").read_text() == (tmp_path / "metadata.jsonl").read_text()


def test_cli_writes_dataset(tmp_path):
    S.main([str(tmp_path / "out"), "--n", "3", "--resolution", "32", "--seed", "1"])
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    assert len((tmp_path / "out" / "metadata.jsonl").read_text().splitlines()) == 3
