"""A package's manifest: what it was built with and for, and the digest of every file, checked before loading."""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from ditfx._version import __version__

FORMAT = "ditfx.package/1"
MANIFEST = "manifest.json"


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
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT, "ditfx": __version__, "torch": torch.__version__, **fields, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


REQUIRED = ("format", "ditfx", "torch", "device", "arch", "model_class", "files")


def read_fields(directory: Path) -> dict:
    """The manifest's fields, checked for form only (not against this process)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise PackageError(f"{directory} is not a ditfx package ({MANIFEST} missing): write one with ditfx.export")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{path} is not valid JSON (line {e.lineno}): export the package again") from None
    missing = [k for k in REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise PackageError(f"{path} lacks {missing}: not a ditfx package manifest, or it was edited; export again")
    if manifest["format"] != FORMAT:
        raise PackageError(f"{path} has format {manifest['format']!r}; this ditfx reads {FORMAT!r}: export the "
                           "package again with this ditfx")
    return manifest


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
        _verify_files(directory, manifest["files"])
    return manifest


def _verify_files(directory: Path, files: dict) -> None:
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    listed = set(files)
    if present != listed:
        raise PackageError(f"{directory} does not hold the files its manifest lists (missing: "
                           f"{sorted(listed - present)[:5]}, unlisted: {sorted(present - listed)[:5]}): export again")
    for name, entry in files.items():
        path = directory / name
        if path.stat().st_size != entry.get("bytes") or digest(path) != entry.get("sha256"):
            raise PackageError(f"{path} does not match the manifest's size or SHA-256 (changed after export): "
                               "export the package again")
