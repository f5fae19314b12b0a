"""A package's manifest: what it was built with and for, and the digest of every file, checked before loading."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ditfx._version import __version__

FORMAT = "ditfx.package/1"
MANIFEST = "manifest.json"
WORK_MARKER = ".ditfx-partial"  # in a build's work directory (never in a package): whose it is, for cleaning up


class PackageError(ValueError):
    """A package that cannot be loaded here: named file, what is wrong, what to do."""


def target(device: torch.device) -> dict:
    """What compiled code depends on: the device type, and the GPU architecture or the CPU's vector ISA."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": "cuda", "arch": f"sm_{major}{minor}"}
    return {"device": device.type, "arch": f"{platform.machine()}-{cpu_isa()}"}


def cpu_isa() -> str:
    """The widest vector ISA torch's CPU kernels use on this machine (``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        return "unknown"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(directory: Path, fields: dict) -> dict:
    """Write ``manifest.json`` listing every file of ``directory`` with its size and digest."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": digest(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (MANIFEST, WORK_MARKER)}
    manifest = {"format": FORMAT, "ditfx": __version__, "torch": torch.__version__, **fields, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass(frozen=True)
class PackageFile:
    """A JSON file of a package, read with errors that name it, the ditfx that wrote it and this one, and what to
    do: a malformed or unknown shape is a :class:`PackageError`, never a ``KeyError`` or ``TypeError`` later."""

    path: Path
    written_by: str | None  # the ditfx version the manifest names (None: not known yet)

    def error(self, what: str) -> PackageError:
        if self.written_by is None or self.written_by == __version__:  # edited or damaged after export
            remedy = f"export the package again (with this ditfx, {__version__})"
        else:
            remedy = (f"it was written by ditfx {self.written_by}, this is ditfx {__version__}: read it with the "
                      f"ditfx that wrote it (pip install ditfx=={self.written_by}) or export the package again "
                      "with this one")
        return PackageError(f"{self.path}: {what}; {remedy}")

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            raise self.error(what)

    def read(self):
        if not self.path.is_file():
            raise self.error("missing")
        try:
            return json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self.error(f"not valid JSON ({e})") from None

    def object(self, data, what: str, required, optional=()) -> dict:
        """``data``, checked to be a JSON object with the ``required`` keys and no others than ``optional``."""
        self.check(isinstance(data, dict), f"{what} is a {type(data).__name__}, not a JSON object")
        missing = [k for k in required if k not in data]
        unknown = sorted(map(str, set(data) - set(required) - set(optional)))
        self.check(not missing, f"{what} lacks {missing}")
        self.check(not unknown, f"{what} has fields this ditfx does not know: {unknown}")
        return data


def is_dtype(name) -> bool:
    """Whether ``name`` is a torch dtype's name (``float32``), as package files write dtypes."""
    return isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)


REQUIRED = ("format", "ditfx", "torch", "device", "arch", "model_class", "files")
OPTIONAL = ("config", "build_seconds")


def read_fields(directory: Path) -> dict:
    """The manifest's fields, checked for form only (not against this process)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise PackageError(f"{directory} is not a ditfx package ({MANIFEST} missing): write one with ditfx.export")
    manifest = PackageFile(path, None).read()
    written_by = manifest.get("ditfx") if isinstance(manifest, dict) else None
    file = PackageFile(path, written_by if isinstance(written_by, str) else None)
    fmt = manifest.get("format", FORMAT) if isinstance(manifest, dict) else FORMAT
    file.check(fmt == FORMAT, f"format {fmt!r}; this ditfx reads {FORMAT!r}")  # first: a newer format's shape differs
    file.object(manifest, "the manifest", REQUIRED, OPTIONAL)
    strings = [k for k in (*REQUIRED[:-1], "config") if k in manifest and not isinstance(manifest[k], str)]
    file.check(not strings, f"{strings} must be strings")
    file.check(_is_device_type(manifest["device"]), f"device {manifest['device']!r} is not a torch device type")
    file.check(isinstance(manifest.get("build_seconds", 0), (int, float)), "build_seconds must be a number")
    files = manifest["files"]
    file.check(isinstance(files, dict), "files must map each file's name to its size and digest")
    for name, entry in files.items():
        file.object(entry, f"files[{name!r}]", ("bytes", "sha256"))
        file.check(isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str),
                   f"files[{name!r}] must have an integer bytes and a string sha256")
    return manifest


def _is_device_type(name: str) -> bool:
    try:
        return torch.device(name).type == name
    except RuntimeError:
        return False


def read(directory: Path, device: torch.device | None, verify: bool = True) -> dict:
    """The manifest of ``directory``, checked against this process (torch version, device, ISA) and, with
    ``verify``, against the files (sizes and digests); raises :class:`PackageError`."""
    manifest = read_fields(directory)
    if manifest["torch"] != torch.__version__:
        raise PackageError(f"{directory} was built with torch {manifest['torch']}, this process has torch "
                           f"{torch.__version__}: compiled artifacts only run on the torch that built them; export "
                           "again here, or rebuild it from its exported programs: ditfx rebuild PACKAGE NEW_PATH")
    here = target(device if device is not None else torch.device(manifest["device"]))
    if device is not None and device.type != manifest["device"]:
        raise PackageError(f"{directory} was built for {manifest['device']} ({manifest['arch']}), asked to load on "
                           f"{device.type}: export the package on and for {device.type}")
    if here["arch"] != manifest["arch"]:
        raise PackageError(f"{directory} was built for {manifest['device']} {manifest['arch']}, this machine is "
                           f"{here['device']} {here['arch']}: export the package on this machine")
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Check that ``directory`` holds exactly the files ``manifest`` lists, with their sizes and SHA-256 digests."""
    files = manifest["files"]
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    listed = set(files)
    if present != listed:
        raise PackageError(f"{directory} does not hold the files its manifest lists (missing: "
                           f"{sorted(listed - present)[:5]}, unlisted: {sorted(present - listed)[:5]}): export again")
    for name, entry in files.items():
        path = directory / name
        if path.stat().st_size != entry["bytes"] or digest(path) != entry["sha256"]:
            raise PackageError(f"{path} does not match the manifest's size or SHA-256 (changed after export): "
                               "export the package again")
