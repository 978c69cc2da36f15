"""benchmarks/lease.sh (and the reference_run.sh it calls) end to end on the CPU, at a toy scale, so that the
one-command GPU lease cannot rot."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from PIL import Image

from pets_diffusion import PetsUNet2DModel

from .helpers import ROOT, launch, make_image_folder, write_pets_copy, write_tiny_config


def test_the_lease_command_trains_for_its_budget_chooses_the_ema_then_draws_and_measures(tmp_path):
    data = make_image_folder(tmp_path / "images", count=16, size=(16, 16))
    config = write_tiny_config(tmp_path / "tiny.json")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "VALIDATION_IMAGES": "4", "PYTHONUNBUFFERED": "1",
           "OUT": str(out), "WORK": str(work), "DATA": str(data), "BUDGET": "5s"}  # fmt: skip
    toy = ["--model_config_name_or_path", str(config), "--resolution", "16",
           "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "10", "--train_batch_size", "4",
           "--post_hoc_ema_every", "2", "--validation_bpd_timesteps", "3"]  # fmt: skip
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "lease.sh"), *toy], capture_output=True, text=True,
                            timeout=900, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--max_train_time spent" in result.stdout  # stopped by its budget, then saved
    assert sorted(path.name for path in out.iterdir()) == [
        "ema_grids.png",
        "lease.log",
        "loss_curve.png",
        "memorization.png",
        "reference_summary.json",
        "samples-ddpm.png",
        "samples-dpmsolver-25.png",
        "trajectory.png",
    ]  # fmt: skip  (the 8 files a lease brings back)
    assert "8 files in" in (out / "lease.log").read_text()
    assert Image.open(out / "samples-dpmsolver-25.png").size == (8 * 16, 8 * 16)  # 64 images
    assert Image.open(out / "samples-ddpm.png").size == (4 * 16, 4 * 16)  # 16 images
    assert Image.open(out / "memorization.png").size == (8 * 16, 2 * 16)
    summary = json.loads((out / "reference_summary.json").read_text())
    assert summary["stopped_by_time_budget"] is True and summary["train_images"] == 12
    assert summary["bpd_kl_timesteps"] == 19 and summary["heldout_images"] == 4  # every timestep of 20
    assert summary["bpd"] > 0 and 0 < summary["bpd_stderr"] < summary["bpd"]
    assert summary["memorization_share"] * 64 == round(summary["memorization_share"] * 64)  # a share of 64 samples
    assert summary["heldout_loss"] > 0
    assert summary["images_seen"] == summary["optimizer_steps"] * 4 > 0 and summary["images_per_sec_median"] > 0
    assert summary["post_hoc_ema"]["selected_by"] == "bpd"  # the EMA was chosen after training
    command = summary["command"]
    assert "train_unconditional.py" in command and "--max_train_time 5s" in command and "--post_hoc_ema" in command
    assert "--learning_rate 2e-4 --lr_warmup_steps 200" in command
    assert summary["versions"]["torch"] == torch.__version__ and summary["device"].startswith("CPU: ")


def test_the_cpu_pets_command_trains_in_two_resumed_pieces_then_draws_and_measures(tmp_path):
    faithful = [f"pet_{index}.jpg" for index in range(12)]
    data = write_pets_copy(tmp_path / "pets", {"train": faithful}, seed=0)
    full = write_pets_copy(tmp_path / "pets-full", {"train": [*faithful, "pet_12.jpg"],
                                                    "stretched_unsquashed": ["pet_13.jpg"]}, seed=1)  # fmt: skip
    config = write_tiny_config(tmp_path / "tiny.json")
    out = tmp_path / "pets"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "FULL": str(full),
           "VALIDATION_IMAGES": "4", "PLAN": "24s"}  # fmt: skip
    toy = ["--model_config_name_or_path", str(config), "--resolution", "16", "--train_batch_size", "4",
           "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "10", "--validation_steps", "2",
           "--validation_bpd_timesteps", "3", "--checkpointing_steps", "2", "--save_images_steps", "2"]  # fmt: skip
    command = ["bash", str(ROOT / "benchmarks" / "cpu_pets.sh"), str(data), str(out), "12s", *toy]
    steps, minutes, fractions = [], [], []
    for piece in (1, 2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads((out / "report" / "reference_summary.json").read_text())
        steps.append(summary["optimizer_steps"])
        minutes.append(summary["run_minutes"])
        fractions.append(json.loads((out / "run" / "train_summary.json").read_text())["lr_schedule"]["fraction"])
        assert summary["stopped_by_time_budget"] is True
        assert ("Resumed from" in (out / "train.log").read_text()) == (piece == 2)
    assert steps[1] > steps[0] > 0  # the second piece trained on from the first's checkpoint
    assert minutes[1] > minutes[0] > 0  # the run's minutes add up over its pieces
    assert 0.45 < fractions[0] < 0.8 and fractions[1] == 1.0  # the 24-second plan ends where the second piece does
    assert summary["heldout_loss_high_noise"] > 0 and summary["progress"]["high_noise"]
    assert summary["train_images"] == 14 - 4  # the full copy less the held-out photos
    grids = summary["progress"]["grids"]
    assert [grid["step"] for grid in grids] == sorted(grid["step"] for grid in grids) and grids[-1]["step"] == steps[1]
    assert [grid["minutes"] for grid in grids] == sorted(grid["minutes"] for grid in grids)
    assert all(bound["bpd"] > 0 and bound["bpd_stderr"] > 0 for bound in summary["progress"]["bounds"])
    command_line = summary["command"]
    assert "--ddpm_beta_schedule squaredcos_cap_v2" in command_line
    assert "--resume_from_checkpoint latest" in command_line
    assert summary["heldout_images"] == 4 and summary["bpd_kl_timesteps"] == 19 and summary["bpd"] > 0
    assert 0 <= summary["memorization_share"] <= 1
    for picture in (
        "samples-dpmsolver-25.png",
        "samples-ddpm.png",
        "trajectory.png",
        "memorization.png",
        "progress.png",
    ):
        assert Image.open(out / "report" / picture).size[0] > 0, picture
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe_table.py"), str(out / "run")],
                           capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()  # fmt: skip
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]  # the recipe table's row of this run
    assert cells[:9] == ["run", "tiny", "full.parquet", "squaredcos_cap_v2", "0.001 linear over 0.4 min", "4",
                         "epsilon, min-SNR γ 5", str(steps[1]), f"{steps[1] * 4:,}"]  # fmt: skip
    compare_two_outs_of_the_same_data(out, tmp_path)


def compare_two_outs_of_the_same_data(out, tmp_path):
    """compare_runs.py pairs two runs from two OUT folders that hold out the same pixels at two paths, naming each
    run's files apart though both folders are called `run`; it refuses a run that holds out other pixels."""
    twin = tmp_path / "twin"
    shutil.copytree(out / "data", twin / "data")
    shutil.copytree(out / "run", twin / "run")
    args = json.loads((twin / "run" / "training_args.json").read_text())
    args["validation_dataset"] = str(twin / "data" / "heldout.parquet")
    (twin / "run" / "training_args.json").write_text(json.dumps(args))
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare_runs.py"), str(out / "run"), str(twin / "run"),
               "--out", str(tmp_path / "compare"), "--nll-timesteps", "3", "--grids", "2", "--sheet"]  # fmt: skip
    result = subprocess.run(compare, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert second["high_noise_minus_first"] == 0 and second["bpd_minus_first"] == 0  # the same weights, paired
    assert {path.name for path in (tmp_path / "compare").glob("*-ddpm-2.png")} == {"pets-run-ddpm-2.png",
                                                                                   "twin-run-ddpm-2.png"}  # fmt: skip
    others = Dataset.from_parquet(str(out / "data" / "full.parquet")).select(range(first["high_noise"]["num_images"]))
    others.to_parquet(twin / "data" / "heldout.parquet")
    result = subprocess.run(compare, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "the runs held out different images" in result.stderr


@pytest.mark.parametrize(("name", "widths", "millions"), [("small-32px", [64, 128, 256], 12.3),
                                                        ("narrow-32px", [32, 64, 128], 3.0)])  # fmt: skip
def test_the_cpu_pets_model_configs_load_and_train_a_step(tmp_path, name, widths, millions):
    data = make_image_folder(tmp_path / "images", count=4, size=(40, 40))
    output = tmp_path / "run"
    config = ROOT / "benchmarks" / "configs" / f"{name}.json"
    launch(["--train_data_dir", str(data), "--model_config_name_or_path", str(config), "--resolution", "32",
            "--output_dir", str(output), "--train_batch_size", "2", "--max_train_steps", "1", "--lr_warmup_steps", "0",
            "--save_images_steps", "100", "--checkpointing_steps", "100", "--seed", "0"])  # fmt: skip
    unet = PetsUNet2DModel.from_pretrained(output, subfolder="unet")
    assert unet.config.sample_size == 32 and list(unet.config.block_out_channels) == widths
    assert round(unet.num_parameters() / 1e6, 1) == millions
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 1
