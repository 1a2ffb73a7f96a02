"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG16 variant:
the perceptual loss of the latent-diffusion autoencoder recipe (taming-transformers `taming/modules/losses/lpips.py`,
richzhang/PerceptualSimilarity `lpips/lpips.py`, version 0.1).

    d(x, y) = sum over the 5 taps l of  mean_hw  w_l . (n(f_l(s(x))) - n(f_l(s(y))))^2

s: the scaling layer ((x - SHIFT) / SCALE, images in [-1, 1]); f_l: VGG16 `features` at relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3; n: unit length along channels; w_l: the learned 1x1 linear layer `lin{l}` (no bias).

Weights are two files the user supplies (neither is needed to build the module, only to make it meaningful):
- the VGG16 backbone: torchvision's ImageNet weights `vgg16-397923af.pth` (VGG16_URL), or any file holding the same
  `features.N.weight/bias` tensors (`classifier.*` is ignored);
- the linear layers: the lpips package's `weights/v0.1/vgg.pth` (LINEAR_URL), keys `lin0.model.1.weight` ...
Both are read as tensors only (safetensors, or `torch.load(weights_only=True)` through sdxl.checkpoints.files).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision's VGG16 (configuration "D"): 3x3 conv widths, "M" a 2x2 max-pool. LPIPS uses it up to relu5_3, so the
# last pool is left out; the indices of `features` (conv, ReLU, pool each count one) are torchvision's.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# The scaling layer: images in [-1, 1] to roughly ImageNet-normalised inputs (lpips.ScalingLayer).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"  # torchvision names its files by the start of their SHA-256
LINEAR_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth"

# The linear layers' file names -> ours (the package wraps each 1x1 conv as `model = Sequential(Dropout, Conv2d)`).
LINEAR_KEYS = {f"lin{i}.model.1.weight": f"lins.{i}.weight" for i in range(len(TAPS))}


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]`: the same modules at the same indices, so its state dict loads."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers)


def unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Each position's feature vector scaled to unit length (lpips.normalize_tensor)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Perceptual distance of two image batches in [-1, 1]: (B, 3, H, W) x 2 -> (B,). Frozen: gradients flow only to
    the images. Randomly initialised; `load_lpips` fills it from the weight files."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.requires_grad_(False).eval()

    def taps(self, x: Tensor) -> list[Tensor]:
        """The unit-normalised features at relu1_2 ... relu5_3 of scaled images."""
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(unit_normalize(h))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        d = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self.taps(x), self.taps(y)):
            d = d + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # spatial average of the weighted squared difference
        return d


# ---------------------------------------------------------------------------------------------
# Weight files.


def _read(path: Path, what: str, url: str, download: bool) -> dict[str, Tensor]:
    """The tensors of a weight file; a missing one is downloaded from `url` first when `download`."""
    from ..checkpoints.files import open_tensors
    from ..checkpoints.keymap import CheckpointError

    if not path.exists() and download:
        _download(url, path, VGG16_SHA256_PREFIX if url == VGG16_URL else None)
    if not path.is_file():
        hint = f" (download it from {url}, or set lpips_download = true)"
        raise ValueError(f"{path}: no such file; expected {what}{hint}")
    try:
        tensors = open_tensors(path)
        return {k: tensors[k] for k in tensors}
    except CheckpointError as e:
        raise ValueError(f"{e}; expected {what}") from None


def _download(url: str, path: Path, sha256_prefix: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256_prefix, progress=False)
    except (OSError, RuntimeError, ValueError) as e:  # no network (URLError), HTTP error, wrong hash
        raise ValueError(f"{path}: could not download {url} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                         ) from None


def _fill(module: nn.Module, state: dict[str, Tensor], path: Path, what: str) -> None:
    """Strict copy of `state` into `module`: every tensor present, of the right shape and floating-point."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and (state[k].shape != expected[k].shape
                                                   or not state[k].is_floating_point())]
    if missing or wrong:
        k = (missing or wrong)[0]
        why = "lacks" if missing else f"has {tuple(state[k].shape)} {state[k].dtype} for"
        raise ValueError(f"{path}: {why} {k} ({len(missing) + len(wrong)} tensor(s) wrong); expected {what}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def load_lpips(vgg: str | Path, linear: str | Path, *, download: bool = False,
               device: torch.device | str | None = None) -> LPIPS:
    """LPIPS with torchvision's VGG16 weights (`vgg`) and the lpips package's linear layers (`linear`); missing files
    are downloaded from VGG16_URL / LINEAR_URL into those paths when `download`. ValueError naming the file."""
    vgg, linear = Path(vgg), Path(linear)
    model = LPIPS()
    backbone = _read(vgg, "torchvision's VGG16 weights (vgg16-397923af.pth: features.N.weight/bias)", VGG16_URL,
                     download)
    _fill(model.features, {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")},
          vgg, "torchvision's VGG16 weights (vgg16-397923af.pth)")
    lins = _read(linear, "the lpips package's weights/v0.1/vgg.pth (lin0.model.1.weight ... lin4)", LINEAR_URL,
                 download)
    _fill(model.lins, {LINEAR_KEYS[k].removeprefix("lins."): v for k, v in lins.items() if k in LINEAR_KEYS},
          linear, "the lpips package's weights/v0.1/vgg.pth (lin0.model.1.weight ... lin4.model.1.weight)")
    return model.to(device) if device is not None else model

