"""What a run keeps on disk: its JSON records, manifests that prove a saved folder whole, free space before a save."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 1 << 22


class DiskFull(RuntimeError):
    """A save ran out of space; the message names the folder, the bytes needed and free, and what is intact."""


class DamagedFolder(ValueError):
    """A saved folder whose files do not match its manifest."""


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    """Record every file's size and SHA-256 in folder/manifest.json, written last (and aside, then renamed)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)
    manifest = {
        "files": {
            str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": file_digest(path)} for path in files
        },  # fmt: skip
        **(extra or {}),
    }
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    partial.replace(folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def verify(folder: Path, checksums: bool = True) -> None:
    """Raise DamagedFolder naming the first problem: no manifest; a file missing, resized or (checksums) altered."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as error:
        raise DamagedFolder(f"{folder.name}'s {MANIFEST} is unreadable ({error})") from None
    if manifest is None:
        raise DamagedFolder(f"{folder.name} has no {MANIFEST} (copied half-way, or saved by pets-diffusion < 0.2)")
    for name, record in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise DamagedFolder(f"{folder.name} lacks {name}")
        if path.stat().st_size != record["bytes"]:
            raise DamagedFolder(f"{folder.name}/{name} has {path.stat().st_size} bytes, not {record['bytes']}")
    if checksums:
        for name, record in manifest["files"].items():
            if file_digest(folder / name) != record["sha256"]:
                raise DamagedFolder(f"{folder.name}/{name} does not match its checksum")


def is_intact(folder: Path) -> bool:
    """Whether `verify` finds the folder whole."""
    try:
        verify(folder)
    except DamagedFolder:
        return False
    return True


def folder_bytes(folder: Path) -> int:
    """The bytes of a saved folder: from its manifest, else by walking it."""
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None:
        return sum(record["bytes"] for record in manifest["files"].values())
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed save ran out of space. safetensors and torch.save do not raise OSError for it, and
    torch.save's message ("unexpected pos") does not say why, so a nearly full disk counts too."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
        return True
    return folder.exists() and free_bytes(folder) < 1 << 20


def megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB"


def out_of_space(folder: Path, what: str, needed: int, intact: str) -> DiskFull:
    """The one-line error of a save that ran out of space: where, what, how much, what is intact, what to do."""
    return DiskFull(
        f"no space left on device in {folder} while saving {what}: it needs about {megabytes(needed)}, "
        f"{megabytes(free_bytes(folder))} are free; {intact}. Free space, then resume with "
        "--resume_from_checkpoint latest."
    )


def read_json(path: Path) -> dict:
    """A run's JSON record at `path` (training_args.json, train_summary.json, ...), or {} when it has none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, record: dict) -> None:
    """Write a run's JSON record whole: to a temporary file beside it, then renamed over it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
