"""What `sdxl serve`'s flags set. Import-light: no torch, no FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"  # localhost only unless --host says otherwise
DEFAULT_PORT = 7860  # AUTOMATIC1111's, where its clients look
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_STEPS = 150  # A1111's slider stops at 150
DEFAULT_MAX_BATCH = 8  # images per call (batch_size; n_iter x batch_size for a whole request: 4x this)
DEFAULT_MAX_PIXELS = 2048 * 2048 * 2  # width x height x batch_size of one call
DEFAULT_MAX_BODY = 64 * 2**20  # bytes of one request (images come base64-encoded in JSON)


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: str | None = None  # the model served first: a file, folder, "builtin" (default) or cached Hub id
    refiner: str | None = None
    models_dirs: list[Path] = field(default_factory=list)
    lora_dirs: list[Path] = field(default_factory=list)
    embedding_dirs: list[Path] = field(default_factory=list)
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    dtype: str | None = None
    low_memory: bool = False  # sdxl.load(low_memory=True): 8-bit U-Net, text encoders freed between prompts
    users: dict[str, str] = field(default_factory=dict)  # --api-auth USER:PASS -> {user: password}
    api_keys: list[str] = field(default_factory=list)  # --api-key KEY (Bearer)
    outputs: Path | None = None  # where images are saved (None: --no-save)
    max_queue: int = DEFAULT_MAX_QUEUE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = DEFAULT_MAX_STEPS
    max_batch: int = DEFAULT_MAX_BATCH
    max_body: int = DEFAULT_MAX_BODY
    taesd: Path | None = None  # a TAESD / TAESDXL decoder file for previews
    allow_download: bool = False

    @property
    def protected(self) -> bool:
        return bool(self.users or self.api_keys)

    def limits(self) -> str:
        return (f"limits: {self.max_queue} queued jobs, {self.max_pixels:,} pixels per call (width x height x batch), "
                f"{self.max_steps} steps, batch size {self.max_batch}, {self.max_body // 2**20} MiB per request")


def parse_users(values: list[str]) -> dict[str, str]:
    """--api-auth USER:PASS[,USER:PASS] (repeatable) -> {user: password}; ValueError naming a bad entry."""
    users: dict[str, str] = {}
    for value in values:
        for entry in value.split(","):
            user, sep, password = entry.strip().partition(":")
            if not sep or not user or not password:
                raise ValueError(f"--api-auth {entry.strip()!r}: expected USER:PASSWORD (several joined by commas)")
            users[user] = password
    return users


def parse_devices(value: str) -> list[str]:
    """--devices cpu | cuda:0,cuda:1 | all (every CUDA device, else the CPU) | cpu,cpu (two CPU workers)."""
    value = value.strip()
    if value == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = [d.strip() for d in value.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"--devices {value!r}: expected cpu, cuda:0,cuda:1, ... or all")
    for d in devices:
        kind, _, index = d.partition(":")
        if kind not in ("cpu", "cuda", "mps", "xpu") or (index and not index.isdigit()):
            raise ValueError(f"--devices {d!r}: expected cpu, cuda, cuda:N, mps, xpu:N or all")
    return devices
