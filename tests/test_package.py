"""The package as users receive it: a built wheel installed in a fresh venv outside the checkout trains, samples,
evaluates, pushes and loads back with plain diffusers; a pushed Space installs its requirements.txt as a Space
would and serves its page. These tests build and install for real (pip, the project's constraints file)."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .helpers import ROOT, TINY_CONFIG_JSON, make_image_folder
from .hub_helpers import LOAD_WITH_ONLY_DIFFUSERS, hub_env, training_output_folder
from .venvs import CONSTRAINTS, clean_env, fresh_venv, run


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """`python -m build` on a copy of the checkout's tracked files: an sdist and a wheel."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, ROOT], cwd=out)
    return out


def test_the_wheel_holds_the_package_the_card_template_and_the_entry_points_only(dist):
    run([sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())], cwd=dist)
    (wheel,) = dist.glob("pets_diffusion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    package = sorted(name for name in names if name.startswith("pets_diffusion/"))
    modules = [f"pets_diffusion/{path.name}" for path in (ROOT / "pets_diffusion").glob("*.py")]
    assert package == sorted([*modules, "pets_diffusion/pet_classifier.safetensors"])  # the measure's weights too
    data = [name for name in names if ".data/" in name]
    assert data == [f"{wheel.name.split('-py3')[0]}.data/data/share/pets-diffusion/model_card.md"]
    others = [name for name in names if name not in package and name not in data]
    assert all(".dist-info/" in name for name in others), others  # no tests, benchmarks or docs
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pets-diffusion = pets_diffusion.cli:main" in entry_points


def test_installed_from_the_wheel_it_trains_samples_evaluates_and_pushes(dist, hub, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    (wheel,) = dist.glob("pets_diffusion-*.whl")
    run([python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, f"{wheel}[demo]"], cwd=tmp_path, timeout=1800)
    work = tmp_path / "work"  # outside the checkout, which is on no path
    work.mkdir()
    env = clean_env(ACCELERATE_USE_CPU="true")
    where = run([python, "-c", "import pets_diffusion; print(pets_diffusion.__file__)"], cwd=work, env=env).stdout
    assert str(tmp_path / "venv") in where and str(ROOT) not in where
    bin_dir = python.parent
    images = make_image_folder(work / "images", count=12)
    (work / "tiny.json").write_text(json.dumps(TINY_CONFIG_JSON))
    run([bin_dir / "accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pets_diffusion.train",
         "--train_data_dir", images, "--model_config_name_or_path", work / "tiny.json", "--resolution", "16",
         "--output_dir", work / "run", "--train_batch_size", "4", "--max_train_steps", "4",
         "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "2", "--save_images_steps", "4",
         "--validation_images", "4", "--validation_bpd_timesteps", "2", "--seed", "0"], cwd=work, env=env)  # fmt: skip
    assert json.loads((work / "run" / "train_summary.json").read_text())["global_step"] == 4
    run([bin_dir / "pets-diffusion", "train", "--train_data_dir", images, "--model_config_name_or_path",
         work / "tiny.json", "--resolution", "16", "--output_dir", work / "one-process", "--train_batch_size", "4",
         "--max_train_steps", "2", "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "2"],
        cwd=work, env=env)  # fmt: skip
    assert json.loads((work / "one-process" / "train_summary.json").read_text())["global_step"] == 2
    run([bin_dir / "pets-diffusion", "sample", work / "run", "--num-images", "4", "--steps", "3",
         "--out", work / "grid.png"], cwd=work, env=env)  # fmt: skip
    assert (work / "grid.png").is_file()
    run([bin_dir / "pets-diffusion", "evaluate", work / "run", "--split", "heldout", "--nll-timesteps", "2",
         "--metrics", "nll,pet_fd", "--num-samples", "16", "--steps", "3"], cwd=work, env=env)  # fmt: skip
    metrics = json.loads((work / "run" / "evaluation.json").read_text())["metrics"]
    assert "bpd" in metrics and metrics["pet_fd"] > 0  # the classifier's weights came with the wheel
    hub_vars = hub_env(hub, tmp_path)
    push = run([bin_dir / "pets-diffusion", "push", work / "run", "--repo-id", "tester/from-wheel"], cwd=work,
               env={**env, **{key: value for key, value in hub_vars.items() if key.startswith("HF_")},
                    "HF_HUB_OFFLINE": "0"})  # fmt: skip
    assert "pushed" in push.stdout
    card = hub.state.repos["tester/from-wheel"].branches["main"]["README.md"].decode()
    assert "Held out during training" in card and "| bpd |" in card  # the card template came with the wheel
    assert "{{" not in card
    load = subprocess.run([python, "-c", LOAD_WITH_ONLY_DIFFUSERS, "tester/from-wheel"], env=hub_vars, cwd=work,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert load.returncode == 0 and "sampled 2" in load.stdout, load.stderr[-3000:]


def test_a_pushed_space_installs_as_a_space_does_and_serves_its_page(hub, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra (Gradio) is not installed")
    output = training_output_folder(tmp_path / "run")
    env = hub_env(hub, tmp_path)
    pets_diffusion = Path(sys.executable).with_name("pets-diffusion")
    run([pets_diffusion, "push", output, "--repo-id", "tester/for-space", "--space", "tester/space-demo"],
        cwd=tmp_path, env=env)  # fmt: skip
    files = hub.state.spaces["tester/space-demo"].branches["main"]
    space = tmp_path / "space"
    for name, content in files.items():
        (space / name).parent.mkdir(parents=True, exist_ok=True)
        (space / name).write_bytes(content)
    # As a Space builds: requirements.txt alone, from elsewhere, before the repository's other files.
    (tmp_path / "mount").mkdir()
    shutil.copyfile(space / "requirements.txt", tmp_path / "mount" / "requirements.txt")
    python = fresh_venv(tmp_path / "venv")
    run([python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, "-r", tmp_path / "mount" / "requirements.txt"],
        cwd=tmp_path / "mount", env=clean_env(), timeout=1800)  # fmt: skip
    missing = subprocess.run([python, "-c", "import pets_diffusion"], cwd=tmp_path, capture_output=True)
    assert missing.returncode != 0  # the Space has no pets-diffusion: only torch, diffusers and Gradio
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "app-tmp").mkdir()
    app_env = {**clean_env(), **env, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
               "TMPDIR": str(tmp_path / "app-tmp"), "HF_HUB_OFFLINE": "0"}  # fmt: skip
    app = subprocess.Popen([python, "app.py"], cwd=space, env=app_env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        page = None
        for _ in range(480):
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                assert app.poll() is None, app.stdout.read()[-3000:]
                time.sleep(0.5)
        assert page is not None and "pets-diffusion: tester/for-space" in page
    finally:
        app.kill()
        app.wait()
