"""Which model `sdxl generate` uses when --model is not given, and whether Hub downloads are allowed.

The model is the first of:

1. `--model PATH` on the command line;
2. the `SDXL_MODEL` environment variable;
3. `model = "..."` in the config file: `$SDXL_CONFIG` if set, else `$XDG_CONFIG_HOME/sdxl/config.toml`
   (`~/.config/sdxl/config.toml` when XDG_CONFIG_HOME is unset);
4. the built-in model ("builtin": a tiny SDXL-family model trained on coloured shapes that ships with the
   package, see `sdxl.builtin`).

A model may be a .safetensors file, a diffusers folder or a Hugging Face Hub repo id. Repo ids are
looked up in the local Hugging Face cache only, unless downloads are allowed with `--allow-download`
or `SDXL_ALLOW_DOWNLOAD=1` (also `allow_download = true` in the config file).

Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODEL_ENV = "SDXL_MODEL"
CONFIG_ENV = "SDXL_CONFIG"
ALLOW_DOWNLOAD_ENV = "SDXL_ALLOW_DOWNLOAD"
BUILTIN_MODEL: str | None = "builtin"  # sdxl.builtin: resolved to the packaged file by pipeline.resolve_path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def config_path() -> Path:
    """The config file's path (it need not exist): $SDXL_CONFIG, else the XDG location."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "sdxl" / "config.toml"


def _toml():
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ValueError(
                f"reading the config file {config_path()} needs Python 3.11+ or the tomli package "
                f"(pip install tomli); or pass --model, or set {MODEL_ENV}"
            ) from None
    return tomllib


KEYS = ("model", "allow_download", "lora_dirs", "embedding_dirs")  # what the config file may set


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The config file's table; {} when there is none. ValueError (naming the file and the key) when it cannot
    be read or a value has the wrong type; a warning for keys sdxl does not read (a misspelt `model`?)."""
    path = config_path() if path is None else Path(path)
    if not path.is_file():
        if os.environ.get(CONFIG_ENV):  # asked for explicitly: a missing file is a mistake
            raise ValueError(f"{path}: no such config file (from ${CONFIG_ENV})")
        return {}
    tomllib = _toml()
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not a valid TOML config file ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start}); TOML files are UTF-8") from None
    _check_config(path, config)
    return config


def _check_config(path: Path, config: dict[str, Any]) -> None:
    model = config.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValueError(f"{path}: 'model' must be a non-empty string (a checkpoint path or Hub repo id), got {model!r}")
    if "allow_download" in config and not isinstance(config["allow_download"], bool):
        raise ValueError(f"{path}: 'allow_download' must be true or false, got {config['allow_download']!r}")
    unknown = [key for key in config if key not in KEYS]
    if unknown:
        import warnings

        warnings.warn(f"{path}: sdxl does not read {', '.join(map(repr, unknown))}; its keys are {', '.join(KEYS)}",
                      stacklevel=3)


def how_to_choose_a_model() -> str:
    return (f"no model: pass --model PATH (an SDXL .safetensors file, diffusers folder or Hub repo id), "
            f"set {MODEL_ENV}=PATH, or put model = \"PATH\" in {config_path()}")


def resolve_model(cli_value: str | None) -> tuple[str, str]:
    """(model, where it came from): --model > $SDXL_MODEL > config file > built-in. ValueError when none."""
    if cli_value:
        return cli_value, "--model"
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV], f"${MODEL_ENV}"
    config = read_config()
    if config.get("model"):
        model = config["model"]
        path = Path(model).expanduser()
        if not path.is_absolute() and (config_path().parent / path).exists():
            model = str(config_path().parent / path)  # relative paths are relative to the config file
        return model, str(config_path())
    if BUILTIN_MODEL:
        return BUILTIN_MODEL, "built-in"
    raise ValueError(how_to_choose_a_model())


def allow_download(cli_flag: bool) -> bool:
    """--allow-download, else SDXL_ALLOW_DOWNLOAD (1/true/yes/on), else `allow_download` in the config file."""
    if cli_flag:
        return True
    value = os.environ.get(ALLOW_DOWNLOAD_ENV)
    if value is not None:
        if value.strip().lower() in _TRUE:
            return True
        if value.strip().lower() in _FALSE:
            return False
        raise ValueError(f"{ALLOW_DOWNLOAD_ENV} must be 1 or 0 (true/false), got {value!r}")
    return read_config().get("allow_download") is True


LORA_DIRS_ENV = "SDXL_LORA_DIRS"
EMBEDDING_DIRS_ENV = "SDXL_EMBEDDING_DIRS"


def folders(kind: str, cli: list[str] | None) -> list[Path]:
    """The LoRA ("lora") or embedding ("embedding") folders: the command line's, then $SDXL_LORA_DIRS /
    $SDXL_EMBEDDING_DIRS (os.pathsep-separated), then `lora_dirs` / `embedding_dirs` in the config file (a list of
    paths, relative ones relative to the file)."""
    env = LORA_DIRS_ENV if kind == "lora" else EMBEDDING_DIRS_ENV
    found = [Path(p).expanduser() for p in cli or ()]
    found += [Path(p).expanduser() for p in os.environ.get(env, "").split(os.pathsep) if p.strip()]
    key = f"{kind}_dirs"
    listed = read_config().get(key, [])
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ValueError(f"{config_path()}: '{key}' must be a list of folder paths, got {listed!r}")
    found += [config_path().parent / Path(p).expanduser() for p in listed]
    out = []
    for folder in found:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such {kind} folder")
        if folder not in out:
            out.append(folder)
    return out
