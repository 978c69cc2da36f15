"""Fresh virtualenvs for the tests that install the project as a user does, and commands run in them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .helpers import ROOT

CONSTRAINTS = ROOT / "constraints.txt"
VENV_FREE_BYTES = 2 * 10**9  # measured: about 1 GB installed beside the shared torch, plus room for pip's unpacking
# torch's stack (5.5 GB with its CUDA libraries): shared with the new venvs, not copied into each.
SHARED_PACKAGES = ("torch", "torchgen", "functorch", "torchvision", "torchvision.libs", "triton", "nvidia", "cuda")
SHARED_DISTRIBUTIONS = ("torch-", "torchvision-", "triton-", "nvidia_", "cuda_")


def run(command: list, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def clean_env(**extra) -> dict:
    """The environment without this test run's virtualenv, Python path or Hugging Face settings."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    env = {key: value for key, value in os.environ.items() if key not in drop and not key.startswith("HF_")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def fresh_venv(folder: Path) -> Path:
    """A new virtualenv holding nothing of this one's but torch's stack, returning its python.

    torch, torchvision, triton and the CUDA libraries (the same pinned versions) are linked in from this
    venv, with their dist-info, so pip finds them installed and resolves and installs everything else
    itself: a copy would cost 5.5 GB and minutes per venv. A disk too full for the rest fails here in one line.
    """
    free = shutil.disk_usage(folder.parent).free
    assert free >= VENV_FREE_BYTES, (
        f"a fresh venv needs about {VENV_FREE_BYTES / 1e9:.0f} GB free in {folder.parent}, "
        f"{free / 1e9:.1f} GB are: free some space (or pass pytest --basetemp on a larger disk) and rerun"
    )
    run([sys.executable, "-m", "venv", folder], cwd=folder.parent)
    python = folder / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder.parent)
    target, source = Path(purelib.stdout.strip()), Path(torch.__file__).resolve().parents[1]
    for entry in source.iterdir():
        if entry.name in SHARED_PACKAGES or entry.name.startswith(SHARED_DISTRIBUTIONS):
            (target / entry.name).symlink_to(entry)
    return python
