"""Where a model named by a user is: a local file or folder, a built-in model, or a Hub repo in the local cache.

Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from .. import builtin

__all__ = ["resolve_path"]


def resolve_path(name: str | Path, *, allow_download: bool = False) -> Path:
    """A local file or folder, a built-in model name ("builtin", "builtin-refiner"), or a Hugging Face Hub repo
    id found in the local cache.

    The Hub is only asked (and the repo downloaded into the cache) with allow_download=True.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    packaged = builtin.path(str(name))
    if packaged is not None:
        if not packaged.is_file():
            raise FileNotFoundError(f"{name}: the built-in model's file {packaged} is missing from this installation")
        return packaged
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".ckpt")):
        raise FileNotFoundError(f"{text}: no such file or folder")
    return _from_hub(text, allow_download)


def _from_hub(repo: str, allow_download: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"{repo!r} is not a local path; to use a Hugging Face Hub repo id install huggingface_hub "
            "(pip install 'sdxl[hub]') and download the repo first"
        ) from None
    try:
        return Path(snapshot_download(repo, local_files_only=not allow_download))
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, ...
        if allow_download:
            raise FileNotFoundError(f"{repo}: could not download this Hub repo ({type(e).__name__}: {e})") from None
        raise FileNotFoundError(
            f"{repo}: not a local path, and the Hub repo is not in the local Hugging Face cache "
            f"({type(e).__name__}); download it first, e.g. `huggingface-cli download {repo}`"
        ) from None
