"""Packages are written safely and read strictly: a package is replaced only once the new one is complete, nothing
ditfx did not create is removed, compile workers end with their export, ``rebuild`` checks a package as ``load``
does, and every package file of a shape this ditfx does not read, call it cannot serve or export it cannot make is
refused with an error naming the file or argument and what to do.

Cheap: the package here is exported with the compile step faked (placeholder artifacts, never loaded); what needs
compiled artifacts is tested in tests/test_package.py."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ditfx
from conftest import tiny_model
from ditfx import cli
from ditfx._version import __version__
from ditfx.package import build
from ditfx.package import manifest as manifest_io
from ditfx.package.call import CallError, CallSpec
from ditfx.package.manifest import PackageError

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def fake_compile(source, directory, compiles, jobs, say, device=None):
    """``compile_programs`` without AOTInductor: placeholder artifacts, the programs saved as compiling saves them."""
    for folder in ("artifacts", "programs"):
        (directory / folder).mkdir(parents=True, exist_ok=True)
    for entry, _ in compiles:
        (directory / "artifacts" / entry.name).write_bytes(b"not compiled")
        if source != directory:
            shutil.copy(source / "programs" / entry.name, directory / "programs" / entry.name)


def failing_compile(*args, **kwargs):
    raise RuntimeError("the C++ compiler failed")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The tiny reference DiT (a call of x, t, y; batch 2) exported without techniques, its artifacts faked."""
    model, kw = tiny_model("reference")
    path = tmp_path_factory.mktemp("safety") / "pkg"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "compile_programs", fake_compile)
        ditfx.export(model, path, example_inputs=kw, config=ditfx.Config(compiler="eager"), jobs=1)
    return path


def copy(package: Path, path: Path) -> Path:
    shutil.copytree(package, path)
    return path


def verified(path: Path) -> Path:
    manifest_io.verify_files(path, manifest_io.read_fields(path))
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------- replacing a package
def test_a_failed_export_leaves_the_old_package_and_what_ditfx_did_not_write(package, tmp_path, monkeypatch):
    old = copy(package, tmp_path / "pkg")
    mine = tmp_path / "pkg.partial"  # a user's folder, with the name export once wrote into (and removed)
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.setattr(build, "compile_programs", failing_compile)
    model, kw = tiny_model("reference")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler failed"):
        ditfx.export(model, old, example_inputs=kw, config=ditfx.Config(compiler="eager"), overwrite=True, jobs=1)
    verified(old)  # whole, as before
    assert (mine / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == ["pkg", "pkg.partial"]  # no work directory left behind


def test_overwrite_replaces_a_package_only_once_the_new_one_is_complete(package, tmp_path, monkeypatch):
    target = copy(package, tmp_path / "pkg")
    (target / "old.txt").write_text("the package before")
    monkeypatch.setattr(build, "compile_programs", failing_compile)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler failed"):
        build.rebuild(package, target, overwrite=True)
    assert (target / "old.txt").exists() and listing(tmp_path) == ["pkg"]
    monkeypatch.setattr(build, "compile_programs", fake_compile)
    assert build.rebuild(package, target, overwrite=True) == target
    assert not (target / "old.txt").exists()
    # in place: the package is read before it is replaced
    build.rebuild(target, target, overwrite=True)
    verified(target)
    assert listing(tmp_path) == ["pkg"]


def test_only_work_directories_of_killed_builds_are_removed(package, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "compile_programs", fake_compile)
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()

    def work_directory(name: str, owner: dict | None) -> Path:
        folder = tmp_path / f".pkg.{name}{build.WORK_SUFFIX}"
        folder.mkdir()
        (folder / "programs.pt2").write_text("half written")
        if owner is not None:
            (folder / manifest_io.WORK_MARKER).write_text(json.dumps(owner))
        return folder

    host = socket.gethostname()
    killed = work_directory("killed", {"pid": ended.pid, "host": host})
    running = work_directory("running", {"pid": os.getpid(), "host": host})
    elsewhere = work_directory("elsewhere", {"pid": ended.pid, "host": f"{host}-another"})  # its pid means nothing
    unmarked = work_directory("unmarked", None)
    (tmp_path / "pkg.partial").mkdir()
    build.rebuild(package, tmp_path / "pkg")
    assert not killed.exists()
    assert running.exists() and elsewhere.exists() and unmarked.exists() and (tmp_path / "pkg.partial").exists()
    verified(tmp_path / "pkg")
    # readable as any folder made here (a temporary directory would be private to this user)
    assert (tmp_path / "pkg").stat().st_mode == (tmp_path / "pkg.partial").stat().st_mode


def test_targets_that_are_not_packages_are_refused_before_work(package, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(copy(package, tmp_path / "pkg"), target_is_directory=True)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    model, kw = tiny_model("reference")
    for target in (file, link):
        with pytest.raises(FileExistsError, match="is a file or a link, not a package directory"):
            build.rebuild(package, target, overwrite=True)
        with pytest.raises(FileExistsError, match="is a file or a link, not a package directory"):
            ditfx.export(model, target, example_inputs=kw, overwrite=True)
    with pytest.raises(FileExistsError, match="not a ditfx package .*refusing to overwrite it"):
        build.rebuild(package, folder, overwrite=True)
    with pytest.raises(FileExistsError, match="exists and is not empty: pass overwrite=True"):
        build.rebuild(package, tmp_path / "pkg")
    with pytest.raises(ValueError, match="hold one another"):
        build.rebuild(tmp_path / "pkg", tmp_path / "pkg" / "rebuilt", overwrite=True)
    with pytest.raises(FileExistsError, match="is inside the package .*pkg: give a path outside it"):
        build.rebuild(package, tmp_path / "pkg" / "plan" / "rebuilt")
    with pytest.raises(FileExistsError, match="is inside the package"):
        ditfx.export(model, tmp_path / "pkg" / "exported", example_inputs=kw)
    with pytest.raises(ValueError, match="hold one another"):
        build.rebuild(tmp_path / "pkg", tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="device 'bogus' \\(--device\\)"):
        build.rebuild(package, tmp_path / "new", device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' \\(--device\\) on this machine"):
            build.rebuild(package, tmp_path / "new", device="cuda")
    assert listing(tmp_path) == ["file", "folder", "link", "pkg"] and listing(folder) == ["x.txt"]


# ------------------------------------------------------------------------ rebuild checks as load does
@pytest.mark.parametrize("edit", ["weights changed", "file added", "file removed"])
def test_rebuild_refuses_a_tampered_package_as_load_does(package, tmp_path, edit):
    edited = copy(package, tmp_path / "pkg")
    weights = edited / "weights.safetensors"
    if edit == "weights changed":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif edit == "file added":
        (edited / "plan" / "extra.json").write_text("{}")
    else:
        (edited / "call.json").unlink()
    with pytest.raises(PackageError) as loading:
        ditfx.load(edited)
    with pytest.raises(PackageError) as rebuilding:
        build.rebuild(edited, tmp_path / "rebuilt")
    assert str(rebuilding.value) == str(loading.value)
    assert ("does not match the manifest's size or SHA-256" if edit == "weights changed"
            else "does not hold the files its manifest lists") in str(loading.value)
    assert listing(tmp_path) == ["pkg"]


# --------------------------------------------------------------- package files this ditfx does not read
def signed(path: Path, version: str) -> None:
    """A fresh manifest over ``path``'s files, as ditfx ``version`` would write it."""
    manifest = json.loads((path / "manifest.json").read_text())
    fields = {k: v for k, v in manifest.items() if k not in ("format", "ditfx", "torch", "files")}
    written = manifest_io.write(path, fields)
    (path / "manifest.json").write_text(json.dumps({**written, "ditfx": version}))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _set(data: dict, key: str, value) -> dict:
    data[key] = value
    return data


def _first_artifact(data: dict, key: str, value) -> dict:
    data["artifacts"][0][key] = value
    return data


def _io(data: dict) -> dict:
    data["io"]["stream_order"] = []
    return data


NEWER = {  # file, edit, what the error says
    "manifest field": ("manifest.json", lambda m: _set(m, "requires", ["sharded weights"]),
                       "fields this ditfx does not know: \\['requires'\\]"),
    "manifest format": ("manifest.json", lambda m: _set(m, "format", "ditfx.package/2"),
                        "format 'ditfx.package/2'; this ditfx reads 'ditfx.package/1'"),
    "manifest files": ("manifest.json", lambda m: _set(m, "files", sorted(m["files"])),
                       "files must map each file's name to its size and digest"),
    "manifest device": ("manifest.json", lambda m: _set(m, "device", "npu9"), "device 'npu9' is not a torch device"),
    "call field": ("call.json", lambda c: _set(c, "keyword_only", ["scale"]),
                   "fields this ditfx does not know: \\['keyword_only'\\]"),
    "call input": ("call.json", lambda c: _set(c, "inputs", [{"buffer": "x"}, *c["inputs"][1:]]),
                   "inputs must be a list of"),
    "call dtype": ("call.json", lambda c: _set(c, "dtype", "float4_e2m1"), "dtype 'float4_e2m1' is not a torch dtype"),
    "call output": ("call.json", lambda c: _set(c, "output", {**c["output"], "kind": "namedtuple"}),
                    "output must hold"),
    "plan field": ("plan/plan.json", lambda p: _set(p, "pipelines", {}),
                   "the plan has fields this ditfx does not know: \\['pipelines'\\]"),
    "plan format": ("plan/plan.json", lambda p: _set(p, "format", "ditfx.plan/3"), "format 'ditfx.plan/3'"),
    "plan region": ("plan/plan.json", lambda p: _set(p, "regions", [{**p["regions"][0], "device": 1}]),
                    "a region has fields this ditfx does not know: \\['device'\\]"),
    "plan io": ("plan/plan.json", _io, "cannot be read \\(TypeError: .*stream_order"),
    "artifact field": ("plan/plan.json", lambda p: _first_artifact(p, "strides", []),
                       "an artifact entry has fields this ditfx does not know: \\['strides'\\]"),
    "artifact rows": ("plan/plan.json", lambda p: _first_artifact(p, "rows", 0), "rows must be 'dynamic' or >= 1"),
    "artifact name": ("plan/plan.json", lambda p: _first_artifact(p, "name", "../weights.safetensors"),
                      "its name must be a .pt2 file name"),
}


@pytest.mark.parametrize("case", sorted(NEWER))
def test_package_files_of_a_newer_ditfx_are_refused_naming_the_file_and_versions(package, tmp_path, case):
    name, edit, message = NEWER[case]
    newer = copy(package, tmp_path / "pkg")
    if name == "manifest.json":
        signed(newer, "9.9.0")
        edit_json(newer / name, edit)
    else:
        edit_json(newer / name, edit)
        signed(newer, "9.9.0")
    for read in (ditfx.load, lambda p: build.rebuild(p, tmp_path / "rebuilt")):
        with pytest.raises(PackageError, match=message) as refused:
            read(newer)
        assert str(refused.value).startswith(f"{newer / name}: ")
        assert f"it was written by ditfx 9.9.0, this is ditfx {__version__}" in str(refused.value)
        assert "pip install ditfx==9.9.0) or export the package again" in str(refused.value)
    assert listing(tmp_path) == ["pkg"]


def test_files_the_package_names_but_lacks_are_refused_naming_them(package, tmp_path):
    lacking = copy(package, tmp_path / "pkg")
    (lacking / "programs" / "0.dynamic.pt2").unlink()
    signed(lacking, __version__)
    with pytest.raises(PackageError, match="programs/0.dynamic.pt2 is missing: the package holds no program"):
        build.rebuild(lacking, tmp_path / "rebuilt")
    (lacking / "artifacts" / "0.dynamic.pt2").unlink()
    signed(lacking, __version__)
    with pytest.raises(PackageError, match="artifacts/0.dynamic.pt2 is missing \\(the plan's artifact table names it"):
        ditfx.load(lacking)
    edit_json(lacking / "call.json", lambda c: _set(c, "inputs", [{"weight": "pos_embed_v2"}, *c["inputs"][1:]]))
    signed(lacking, __version__)
    with pytest.raises(PackageError, match="weights.safetensors lacks \\['pos_embed_v2'\\], which call.json reads"):
        ditfx.load(lacking)
    assert listing(tmp_path) == ["pkg"]


def test_malformed_package_files_of_this_ditfx_say_to_export_again(package, tmp_path):
    edited = copy(package, tmp_path / "pkg")
    (edited / "call.json").write_text('{"parameters": ')
    signed(edited, __version__)
    with pytest.raises(PackageError, match=f"call.json: not valid JSON .*; export the package again \\(with this "
                                           f"ditfx, {__version__}\\)"):
        ditfx.load(edited)
    (edited / "manifest.json").write_text("[]")
    with pytest.raises(PackageError, match="manifest.json: the manifest is a list, not a JSON object; export the "
                                           "package again"):
        ditfx.load(edited)


# ----------------------------------------------------------------------- calls and exports it cannot serve
@pytest.fixture(scope="module")
def spec(package):
    return CallSpec.read(manifest_io.PackageFile(package / "call.json", None))


@pytest.mark.parametrize("given, message", [
    (0.5, "argument t is a float, not a torch.Tensor; this package was exported with a float32 tensor of shape \\[2\\] "
          "there: convert it with torch.tensor\\(value, dtype=torch.float32\\)"),
    ([0.5, 0.5], "argument t is a list, not a torch.Tensor;.*torch.tensor\\(value"),
    (np.ones(2, dtype=np.float32), "argument t is a ndarray, not a torch.Tensor;.*torch.from_numpy\\(array\\)"),
    (np.float32(0.5), "argument t is a float32, not a torch.Tensor;.*torch.tensor\\(value"),
    ([torch.ones(1), torch.ones(1)], "argument t is a list, not a torch.Tensor"),
    (None, "argument t is a NoneType, not a torch.Tensor"),
])
def test_a_call_with_a_non_tensor_for_a_tensor_names_the_argument_and_the_conversion(package, spec, given, message):
    weights = load_file(str(package / "weights.safetensors"))
    _, kw = tiny_model("reference")
    inputs, _ = spec.graph_inputs((), kw, weights)  # the exported call is served
    assert sum(1 for e in spec.inputs if "argument" in e) == 3 and len(inputs) == len(spec.inputs)
    with pytest.raises(CallError, match=message):
        spec.graph_inputs((), {**kw, "t": given}, weights)
    with pytest.raises(CallError, match=message):
        spec.graph_inputs((kw["x"], given, kw["y"]), {}, weights)
    with pytest.raises(CallError, match="argument t is missing; this package was exported with a float32 tensor"):
        spec.graph_inputs((), {"x": kw["x"], "y": kw["y"]}, weights)


def test_batch_zero_is_refused_naming_the_argument(tmp_path, capsys):
    model, kw = tiny_model("reference")
    empty = {k: v[:0] for k, v in kw.items()}
    with pytest.raises(ValueError, match="example_inputs \\['x', 't', 'y'\\] have 0 rows"):
        ditfx.export(model, tmp_path / "p", example_inputs=empty)
    with pytest.raises(ValueError, match="example_inputs \\['1'\\] have 0 rows"):
        ditfx.export(model, tmp_path / "p", example_inputs=(kw["x"], kw["t"][:0], kw["y"]))
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "DiT-T/2", str(tmp_path / "p"), "--batch", "0"])
    assert e.value.code == 2 and "--batch: 0 is not >= 1" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_demo_refuses_another_models_package(package, tmp_path, capsys):
    assert cli.main(["demo", "--package", str(package), "--student", "none", "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert f"{package} is not the digits demo package: its manifest.json names the model ditfx.models.dit.DiT" in err
    assert "make its package with `ditfx export digits PATH --demo`" in err
    # a diffusers DiT package of another config than the digits model's
    other = copy(package, tmp_path / "pkg")
    edit_json(other / "manifest.json", lambda m: _set(
        m, "model_class", "diffusers.models.transformers.dit_transformer_2d.DiTTransformer2DModel"))
    assert cli.main(["demo", "--package", str(other), "--student", "none", "--out", str(tmp_path / "d.png")]) == 2
    assert "its call.json holds a DiTTransformer2DModel of another config than the digits DiT" in \
        capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()


# ------------------------------------------------------------------------------ workers end with the export
def _processes() -> dict[int, tuple[list[str], str, int, int]]:
    """Live processes by pid: (command line, state, parent, session), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state, ppid, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):  # not a process, or ended meanwhile
            continue
        if state != "Z":
            found[int(entry.name)] = (cmdline, state, int(ppid), int(session))
    return found


def _wait_for(condition, seconds: float):
    end = time.monotonic() + seconds
    while not (result := condition()) and time.monotonic() < end:
        time.sleep(0.1)
    return result


@pytest.mark.slow  # a fresh process exporting with two compile workers
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(),
                    reason="the test finds the compile workers through /proc, which this OS does not have")
def test_compile_workers_end_when_the_export_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import ditfx
        from ditfx.models import zoo
        named = zoo.load("DiT-T/2", batch=2)
        ditfx.export(named.model, {str(tmp_path / "pkg")!r}, example_inputs=named.inputs,
                     config=ditfx.Config(compiler="eager"), jobs=2)
    """)
    export = subprocess.Popen([sys.executable, "-c", script])

    def workers() -> list[int]:
        return [pid for pid, (cmdline, _, ppid, _) in _processes().items()
                if ppid == export.pid and any("ditfx.package.build" in part for part in cmdline)]

    found = _wait_for(lambda: len(workers()) == 2 and workers(), 180)
    try:
        assert found, "the export started no compile workers"
        export.send_signal(signal.SIGTERM)  # as a job scheduler's time limit: no cleanup runs
        export.wait(timeout=60)
        # the workers, and the C++ compilers they started (their sessions), are gone within a few seconds
        gone = _wait_for(lambda: not [p for p, info in _processes().items() if p in found or info[3] in found], 10)
        assert gone, f"compile workers outlived their export: {found}"
    finally:
        export.kill()
        for pid in found or []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
