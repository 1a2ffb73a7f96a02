"""sdxl.training.lpips against the `lpips` package (0.1.4, VGG variant) on the same random weights, loaded through
the production loader from files in torchvision's and the package's formats; and its one-line errors."""

from __future__ import annotations

import contextlib
import importlib.util
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from sdxl.training.lpips import LPIPS, load_lpips


# torchvision's vgg16 `features` (configuration "D"), written out as torchvision has it: all that lpips reads of it.
def _vgg16(pretrained: bool = False, **kwargs) -> nn.Module:
    assert not pretrained, "the test never downloads weights"
    model = nn.Module()
    model.features = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )
    return model


@contextlib.contextmanager
def _torchvision():
    """torchvision.models as lpips imports it. This machine's torchvision has no build for its CPU torch
    (importing it fails: torchvision::nms does not exist), so a minimal `torchvision.models` with the `vgg16` above
    stands in, only while lpips is imported and built: other tests never see it."""
    try:
        import torchvision.models  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: a build for another torch
        real = False
    else:
        real = True
    if real:
        yield
        return
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = _vgg16
    sys.modules.update({"torchvision": tv, "torchvision.models": tv.models})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


pytestmark = [pytest.mark.usefixtures("one_thread"),  # small inputs on shared cores (tests/conftest.py)
              pytest.mark.skipif(importlib.util.find_spec("lpips") is None,
                                reason="lpips not installed (bootstrap.sh test installs it)")]


@pytest.fixture(scope="module")
def reference():
    """The package's LPIPS with a random VGG16 (pnet_rand) and random linear layers (pretrained=False)."""
    with _torchvision():
        import lpips

        torch.manual_seed(0)
        return lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()


def _write_reference_files(ref, tmp_path):
    """The reference's weights as torchvision's vgg16 file (features.N.*, plus classifier.* ours ignores) and the
    package's vgg.pth (lin0.model.1.weight ...), written with torch.save as those files are."""
    features = {f"features.{k.split('.', 1)[1]}": v.clone() for k, v in ref.net.state_dict().items()}
    features["classifier.0.weight"] = torch.zeros(4, 4)  # (torchvision's files hold the classifier too)
    lins = {k: v.clone() for k, v in ref.state_dict().items() if k.startswith("lin") and not k.startswith("lins.")}
    assert sorted(lins) == [f"lin{i}.model.1.weight" for i in range(5)]
    torch.save(features, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "vgg.pth")
    return tmp_path / "vgg16.pth", tmp_path / "vgg.pth"


def test_equals_the_lpips_package(reference, tmp_path):
    vgg, linear = _write_reference_files(reference, tmp_path)
    ours = load_lpips(vgg, linear)
    # The same modules at torchvision's indices: its state dict loads as it is.
    assert list(ours.features.state_dict()) == [k.split(".", 1)[1] for k in reference.net.state_dict()]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 48, 40, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1).requires_grad_(True)
    y_ref = y.detach().clone().requires_grad_(True)
    d = ours(x, y)
    d_ref = reference(x, y_ref).flatten()
    assert d.shape == (3,) and torch.all(d != 0)  # (random linear weights: of either sign)
    # measured on this CPU: the distances bit-identical, the input gradients within 2.4e-7 x their largest
    # (float32 rounding); allowed: 1e-6 relative, and 1e-5 x the largest gradient
    torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=1e-9)
    d.sum().backward()
    d_ref.sum().backward()
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=0, atol=1e-5 * float(y_ref.grad.abs().max()))
    assert float(ours(x, x).abs().max()) == 0.0  # identical images: distance 0


def test_the_packages_own_linear_weights(reference, tmp_path):
    """The shipped v0.1 vgg.pth (an old-style pickle) reads through the production loader (weights_only)."""
    import lpips  # (imported by the fixture)

    shipped = importlib.util.find_spec("lpips").submodule_search_locations[0] + "/weights/v0.1/vgg.pth"
    vgg, _ = _write_reference_files(reference, tmp_path)
    ours = load_lpips(vgg, shipped)
    with _torchvision():
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    ref.net.load_state_dict(reference.net.state_dict())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-7)
    assert all(float(lin.weight.min()) >= 0 for lin in ours.lins)  # the calibrated weights are non-negative


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_bad_weight_files(reference, tmp_path):
    vgg, linear = _write_reference_files(reference, tmp_path)
    cases = {
        "missing": (tmp_path / "nope.pth", linear, "nope.pth: no such file; expected torchvision's VGG16"),
        "swapped": (linear, vgg, "vgg.pth: lacks 0.weight"),
        "garbage": (tmp_path / "junk.pth", linear, "junk.pth: refused to load this pickle file"),
        "code": (tmp_path / "evil.pth", linear, "evil.pth: refused to load this pickle file"),
        "linear missing": (vgg, tmp_path / "none.pth", "none.pth: no such file; expected the lpips package's"),
    }
    (tmp_path / "junk.pth").write_bytes(b"<html>not found</html>")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": _Evil()}))
    for name, (a, b, expected) in cases.items():
        with pytest.raises(ValueError) as e:
            load_lpips(a, b)
        message = str(e.value)
        assert expected in message and "\n" not in message, (name, message)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in str(
        pytest.raises(ValueError, load_lpips, tmp_path / "nope.pth", linear).value)


def test_frozen_and_device_free():
    m = LPIPS()
    assert not any(p.requires_grad for p in m.parameters())
    assert set(m.state_dict()) == {*(f"features.{k}" for k in m.features.state_dict()),
                                   *(f"lins.{i}.weight" for i in range(5))}
