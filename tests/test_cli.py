"""The `sdxl` command line, driven as a user would: `python -m sdxl ...` in a subprocess.

Every command starts a fresh Python that imports torch (~2 s of CPU), so all of them are started
together, once per session, and the tests only read their results.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_components

from sdxl.checkpoints.save import save_single_file

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class Payload:
    """Runs `os.system(command)` when unpickled."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# name -> argv after `python -m sdxl` (file names are relative to the working folder).
COMMANDS = {
    "help": ["--help"],
    "info_help": ["info", "--help"],
    "base": ["info", "tiny_base.safetensors"],
    "base_json": ["info", "--json", "tiny_base.safetensors"],
    "sd15": ["info", "sd15.safetensors"],
    "missing": ["info", "no_such_model.safetensors"],
    "truncated": ["info", "truncated.safetensors"],
    "malicious": ["info", "evil.ckpt"],
    "builtin": ["info", "builtin"],
    "builtin_refiner_json": ["info", "--json", "builtin-refiner"],
    "convert_builtin": ["convert", "builtin", "builtin_copy.safetensors"],
}
ERRORS = {  # name -> what the one-line message must say after the file name
    "sd15": "not an SDXL checkpoint: this is a Stable Diffusion 1.x checkpoint",
    "missing": "no such file",
    "truncated": "truncated",
    "malicious": "refused to load this pickle file",
}


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    base = tiny_components("base")
    save_single_file(base, work / "tiny_base.safetensors")
    data = (work / "tiny_base.safetensors").read_bytes()
    (work / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    z = torch.zeros
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": z(8, 4, 3, 3),
            "model.diffusion_model.out.2.weight": z(4, 8, 3, 3),
            "first_stage_model.encoder.conv_in.weight": z(8, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": z(10, 8),
        },
        str(work / "sd15.safetensors"),
    )
    marker = work / "pwned"
    (work / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {"w": Payload(f"touch '{marker}'")}}))

    env = dict(os.environ, COLUMNS="100")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "sdxl", *argv], cwd=work, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for name, argv in COMMANDS.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = SimpleNamespace(rc=proc.returncode, out=out, err=err)
    counts = {name: sum(p.numel() for p in getattr(base, name).parameters()) for name in PARTS}
    counts["text_encoder_2"] += 1  # the OpenCLIP layout's logit_scale, counted as in the official numbers
    return SimpleNamespace(work=work, results=results, counts=counts, marker=marker)


def test_help(cli):
    r = cli.results["help"]
    assert r.rc == 0, r.err
    assert "usage: sdxl" in r.out and "info" in r.out
    assert r.err == ""


def test_info_help(cli):
    r = cli.results["info_help"]
    assert r.rc == 0, r.err
    assert "usage: sdxl info" in r.out
    assert "path" in r.out and "--json" in r.out


def test_info_base(cli):
    r = cli.results["base"]
    assert r.rc == 0, r.err
    assert r.err == ""
    lines = r.out.splitlines()
    assert lines[0] == "tiny_base.safetensors: SDXL base (single-file)"
    for name in PARTS:
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line is not None, (name, r.out)
        assert f"{cli.counts[name]:,} parameters" in line, line
        assert "float16" in line, line
    total = next(ln for ln in lines if ln.split()[:1] == ["total"])
    assert f"{sum(cli.counts.values()):,}" in total


def test_info_json(cli):
    r = cli.results["base_json"]
    assert r.rc == 0, r.err
    info = json.loads(r.out)
    assert info["kind"] == "base" and info["layout"] == "single-file"
    assert info["path"] == "tiny_base.safetensors"
    assert list(info["components"]) == list(PARTS)
    for name in PARTS:
        comp = info["components"][name]
        assert comp["parameters"] == cli.counts[name], name
        assert list(comp["dtypes"]) == ["float16"]
    assert info["notes"] == []


@pytest.mark.parametrize("name", list(ERRORS))
def test_info_errors(cli, name):
    r = cli.results[name]
    path = COMMANDS[name][-1]
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert r.out == ""
    assert "Traceback" not in r.err
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith(f"sdxl info: error: {path}: "), lines[0]
    assert ERRORS[name] in lines[0], lines[0]


def test_malicious_pickle_not_run(cli):
    assert cli.results["malicious"].rc == 2
    assert not cli.marker.exists()
    # Control: the payload does run when unpickled without protection.
    control = cli.work / "control"
    pickle.loads(pickle.dumps(Payload(f"touch '{control}'")))
    assert control.exists()


def test_builtin_names_work_wherever_a_model_path_does(cli):
    from sdxl import builtin
    from sdxl.checkpoints.formats import describe

    r = cli.results["builtin"]
    assert r.rc == 0 and r.err == "", r.err
    assert r.out.splitlines()[0] == f"{builtin.path('builtin')}: SDXL base (single-file)"
    r = cli.results["builtin_refiner_json"]
    assert r.rc == 0, r.err
    assert json.loads(r.out)["kind"] == "refiner"
    r = cli.results["convert_builtin"]
    assert r.rc == 0, r.err
    assert r.out.strip() == "wrote builtin_copy.safetensors (official single file, SDXL base, fp16)"
    copy = describe(cli.work / "builtin_copy.safetensors")
    assert copy.kind == "base" and copy.components.keys() == describe(builtin.path("builtin")).components.keys()


def test_a_closed_stdout_ends_quietly():
    """`sdxl samplers | head -1`: the reader goes away; no "Broken pipe" error, the exit status of a Unix tool
    ended by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "sdxl", "samplers"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""
