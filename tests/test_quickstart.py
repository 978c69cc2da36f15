"""The README's first command as a new user meets it: a fresh clone with nothing beside it, a fresh venv, offline:
it draws pets from the model that ships with the checkout, then trains."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from diffusers import DDPMPipeline

from .helpers import ROOT
from .test_project import readme_commands
from .venvs import clean_env, fresh_venv, run

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")


def test_the_readme_first_command_trains_in_a_fresh_clone_with_no_data_beside_it_and_no_hub(tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", ROOT, clone], cwd=tmp_path)
    assert not (clone.parent / "shared").exists()  # no ../shared/data: the command must bring its own data
    fresh_venv(clone / ".venv")  # torch's stack linked in (5.5 GB not copied); the command installs the rest
    main_job = readme_commands()[0]
    env = clean_env(HF_HOME=str(tmp_path / "hf-home"))  # HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1
    result = subprocess.run(["bash", "-c", main_job], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=2400)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = clone / "runs" / "pets-smoke"
    pipeline = DDPMPipeline.from_pretrained(run_dir)
    assert pipeline.unet.config.sample_size == 64
    assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    assert (run_dir / "samples" / "step-0000020.png").is_file() and (run_dir / "loss_curve.png").is_file()
    args = (run_dir / "training_args.json").read_text()
    assert '"dataset_name": "examples/pets-sample"' in args
    from PIL import Image

    pets = Image.open(clone / "pets.png")  # 64 samples of the shipped 32x32 model, guided as it ships
    assert pets.size == (8 * 32, 8 * 32) and len(set(pets.getdata())) > 1000
    for name, extra in (("here.png", []), ("plain.png", ["--guidance-scale", "1"])):  # this checkout's example
        run([str(PETS_DIFFUSION), "sample", "examples/cpu-pets", "--num-images", "64", "--out", tmp_path / name,
             *extra], cwd=ROOT)  # fmt: skip
    assert np.array_equal(np.asarray(pets), np.asarray(Image.open(tmp_path / "here.png")))  # the same model, seed
    assert not np.array_equal(np.asarray(pets), np.asarray(Image.open(tmp_path / "plain.png")))  # and it is guided
