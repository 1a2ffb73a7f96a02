"""Images are read right, by the one loader for init images, masks and training data (`sdxl.images`): EXIF
orientation, transparency over white, 16-bit and float images at their real range, palettes, CMYK; Python API
arrays and tensors by the same rules; bad files as one-line errors naming the file and the flag."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl import images
from sdxl.interfaces import metadata


def grey16(path, values: np.ndarray):
    Image.fromarray(values.astype(np.uint16)).save(path)  # mode I;16: a 16-bit greyscale PNG
    return path


def test_a_16_bit_grey_png_is_grey_not_white(tmp_path):
    path = grey16(tmp_path / "g16.png", np.full((8, 8), 32896))  # 32896 / 65535 = 128 / 255
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(images.load_image(path))
    assert rgb.shape == (8, 8, 3) and (rgb == 128).all()
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).all()  # what a plain convert makes of it


def test_a_16_bit_mask_repaints_what_it_says(tmp_path):
    values = np.zeros((16, 16))
    values[:, :8], values[:, 8:] = 16384, 49152  # a quarter and three quarters of 65535
    mask = images.load_image(grey16(tmp_path / "m16.png", values), mask=True)
    m = images.prepare_mask(mask, 16, 16)
    assert m.mean() == 0.5 and (m[0, 0, :, 8:] == 1).all() and (m[0, 0, :, :8] == 0).all()
    plain = images.prepare_mask(Image.open(tmp_path / "m16.png").convert("L"), 16, 16)
    assert plain.mean() == 1.0  # read naively, all of it would be repainted


@pytest.mark.parametrize("mode, value, expected", [("F", 0.25, 64), ("I", 65535, 255), ("I", 257 * 10, 10)])
def test_float_and_32_bit_greys_are_scaled_to_their_range(tmp_path, mode, value, expected):
    dtype = np.float32 if mode == "F" else np.int32
    path = tmp_path / "grey.tiff"
    Image.fromarray(np.full((4, 4), value, dtype=dtype), mode).save(path)
    assert Image.open(path).mode == mode
    assert (np.asarray(images.load_image(path)) == expected).all()


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (255, 0, 0)  # left half red
    a[:, 16:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display" (a phone held upright)
    Image.fromarray(a).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    upright = np.asarray(images.load_image(tmp_path / "photo.jpg")).astype(int)
    assert upright.shape == (32, 16, 3)
    assert upright[2, 8, 0] > 200 and upright[2, 8, 2] < 60  # top: the left half, red
    assert upright[29, 8, 2] > 200 and upright[29, 8, 0] < 60  # bottom: blue
    mask = images.load_image(tmp_path / "photo.jpg", mask=True)
    assert mask.size == (16, 32)  # a mask is turned the same way


def test_transparency_is_composited_over_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red ...
    a[:, :2, 3] = 0  # ... transparent on the left,
    a[:, 2:, 3] = 255  # opaque on the right
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    rgb = np.asarray(images.load_image(tmp_path / "rgba.png"))
    assert (rgb[:, :2] == 255).all() and (rgb[:, 2:] == (255, 0, 0)).all()
    la = Image.fromarray(np.stack([np.zeros((4, 4)), np.full((4, 4), 128)], -1).astype(np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert (np.asarray(images.load_image(tmp_path / "la.png")) == 127).all()  # black at half opacity over white


def test_a_mask_with_transparency_is_its_alpha_channel(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., :3] = 255  # white everywhere (read as grey: all "repaint")
    a[2:6, 2:6, 3] = 255  # but only a square is painted; the rest transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "painted.png")
    m = images.prepare_mask(images.load_image(tmp_path / "painted.png", mask=True), 8, 8)
    assert m.sum() == 16 and (m[0, 0, 2:6, 2:6] == 1).all()
    opaque = a.copy()
    opaque[..., 3] = 255
    opaque[:4, :, :3] = 0  # an opaque mask is read by its grey levels
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert images.prepare_mask(images.load_image(tmp_path / "opaque.png", mask=True), 8, 8).mean() == 0.5


def test_palettes_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert (np.asarray(images.load_image(tmp_path / "p.png")) == (10, 200, 30)).all()
    p.save(tmp_path / "pt.png", transparency=1)  # palette entry 1 transparent
    assert (np.asarray(images.load_image(tmp_path / "pt.png")) == 255).all()


def test_cmyk_is_converted(tmp_path):
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    assert (np.asarray(images.load_image(_saved(cyan, tmp_path / "c.tiff"))) == (0, 255, 255)).all()
    jpeg = np.asarray(images.load_image(_saved(cyan, tmp_path / "c.jpg"))).astype(int)  # Adobe CMYK JPEG
    assert np.abs(jpeg - (0, 255, 255)).max() < 8  # not inverted


def _saved(image, path):
    image.save(path)
    return path


def test_api_arrays_and_tensors_follow_the_same_rules():
    assert (np.asarray(images._to_pil(np.full((4, 4), 32896, np.uint16), "RGB")) == 128).all()
    assert (np.asarray(images._to_pil(torch.full((3, 4, 4), 128, dtype=torch.uint8), "RGB")) == 128).all()
    assert (np.asarray(images._to_pil(torch.full((3, 4, 4), 0.5), "RGB")) == 128).all()
    assert (np.asarray(images._to_pil(np.ones((4, 4), bool), "L")) == 255).all()
    rgba = np.zeros((4, 4, 4), np.float32)  # transparent black: white, as from a file
    assert (np.asarray(images._to_pil(rgba, "RGB")) == 255).all()
    t = images.to_tensor(Image.fromarray(np.full((8, 8), 32896, np.uint16)))
    assert t.abs().max() < 0.01  # mid-grey is 0 in the VAE's [-1, 1]
    with pytest.raises(ValueError, match="must hold 0..255"):
        images._to_pil(np.full((4, 4), 300, np.int64), "RGB")
    with pytest.raises(ValueError, match="NaN or infinite"):
        images._to_pil(np.full((4, 4), np.nan, np.float32), "RGB")


def test_the_command_line_reads_its_images_with_the_loader(tmp_path):
    path = grey16(tmp_path / "g16.png", np.full((8, 8), 32896))
    assert (np.asarray(metadata.open_image("--init-image", str(path), "RGB")) == 128).all()
    assert metadata.open_image("--mask", None, "L") is None


def test_bad_image_files_are_one_line_errors_naming_the_file_and_the_flag(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = io.BytesIO()
    noise.save(data, format="PNG")
    (tmp_path / "cut.png").write_bytes(data.getvalue()[:2000])
    (tmp_path / "text.png").write_text("hello")
    cases = {
        "cut.png": "--mask {}: cannot read this image: truncated or corrupt",
        "text.png": "--mask {}: not an image file",
        "gone.png": "--mask {}: no such file",
        ".": "--mask {}: a folder, not an image file",
    }
    for name, message in cases.items():
        path = tmp_path / name
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            images.load_image(path, mask=True, what="--mask")
        assert str(e.value).startswith(message.format(path)) and "\n" not in str(e.value), str(e.value)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"big\.png: 100x100 = 10,000 pixels, more than the 9,999 .*--max-image-pixels"):
        images.load_image(tmp_path / "big.png", max_pixels=9_999)
    assert images.load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)


def test_images_beyond_pils_own_limit_read_when_allowed(tmp_path, monkeypatch):
    Image.new("L", (60, 50)).save(tmp_path / "wide.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would refuse this (> 2 x its limit) ...
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "wide.png")
    assert images.load_image(tmp_path / "wide.png", max_pixels=3000).size == (60, 50)  # ... a larger limit reads it
    assert Image.MAX_IMAGE_PIXELS == 1000  # and PIL's own is left as it was
