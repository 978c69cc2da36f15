"""The benchmark tools end to end on the CPU at a toy scale, so that they cannot rot: the one-command GPU lease
(benchmarks/lease.sh), the CPU pets recipe (cpu_pets.sh), the comparison of runs (compare_runs.py) and the guidance
sweep (guidance_sweep.py)."""

import json
import os
import re
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
           "OUT": str(out), "WORK": str(work), "DATA": str(data), "BUDGET": "5s",
           "REPORT_FLAGS": "--num-samples 64"}  # fmt: skip
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
        "report.json",
        "samples-ddpm.png",
        "samples-dpmsolver-25.png",
        "trajectory.png",
    ]  # fmt: skip  (the 8 files a lease brings back)
    assert "8 files in" in (out / "lease.log").read_text()
    assert Image.open(out / "samples-dpmsolver-25.png").size == (8 * 16, 8 * 16)  # 64 images
    assert Image.open(out / "samples-ddpm.png").size == (4 * 16, 4 * 16)  # 16 images
    assert Image.open(out / "memorization.png").size == (8 * 16, 2 * 16)
    summary = json.loads((out / "report.json").read_text())
    assert json.loads((work / "run" / "train_summary.json").read_text())["stopped_by_time_budget"] is True
    assert summary["train_images"] == 12
    assert summary["bpd_kl_timesteps"] == 19 and summary["heldout_images"] == 4  # every timestep of 20
    assert summary["bpd"] > 0 and 0 < summary["bpd_stderr"] < summary["bpd"]
    drawn = summary["samples"]["unguided"]
    assert drawn["memorization_share"] * 64 == round(drawn["memorization_share"] * 64)  # a share of 64 samples
    assert drawn["pet_fd"] > drawn["pet_fd_real"] >= 0 and drawn["images"] == 64  # 12 training images: floor ~0
    assert summary["heldout_loss"] > 0
    assert summary["images_seen"] == summary["optimizer_steps"] * 4 > 0 and summary["images_per_sec_median"] > 0
    assert summary["post_hoc_ema"]["selected_by"] == "bpd"  # the EMA was chosen after training
    command = (out / "lease.log").read_text()
    assert "train_unconditional.py" in command and "--max_train_time 5s" in command and "--post_hoc_ema" in command
    assert "--learning_rate 2e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 200" in command
    assert summary["versions"]["torch"] == torch.__version__ and summary["device"].startswith("CPU: ")


def test_the_cpu_pets_command_trains_over_its_plan_in_two_invocations_then_draws_and_measures(tmp_path):
    faithful = [f"pet_{index}.jpg" for index in range(12)]
    data = write_pets_copy(tmp_path / "pets", {"train": faithful}, seed=0)
    full = write_pets_copy(tmp_path / "pets-full", {"train": [*faithful, "pet_12.jpg"],
                                                    "stretched_unsquashed": ["pet_13.jpg"]}, seed=1)  # fmt: skip
    config = write_tiny_config(tmp_path / "tiny.json")
    out = tmp_path / "pets"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "FULL": str(full),
           "VALIDATION_IMAGES": "4", "REPORT_FLAGS": "--num-samples 64 --nll-timesteps 3"}  # fmt: skip
    toy = ["--model_config_name_or_path", str(config), "--resolution", "16", "--train_batch_size", "4",
           "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "10", "--validation_steps", "50",
           "--validation_bpd_timesteps", "3", "--checkpointing_steps", "50", "--save_images_steps", "50"]  # fmt: skip
    command = ["bash", str(ROOT / "benchmarks" / "cpu_pets.sh"), str(data), str(out), "20s", *toy]
    steps, fractions = [], []
    for invocation, limit in ((1, "8s"), (2, "")):  # the first stopped early by MAX_TRAIN_TIME, the second by the plan
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                                env={**env, "MAX_TRAIN_TIME": limit})  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # compiling would spend the toy plan's 20 seconds: the recipe's rule leaves a plan under 15 minutes eager
        assert "The UNet runs eager: a plan of 20s would not repay the first step" in result.stdout
        summary = json.loads((out / "report" / "report.json").read_text())
        steps.append(summary["optimizer_steps"])
        fractions.append(summary["lr_schedule"]["fraction"])
        assert ("Resumed from" in (out / "train.log").read_text()) == (invocation == 2)
    assert "--max_train_time 8 s ends this invocation before --lr_schedule_time's plan is spent" in (
        out / "train.log").read_text()  # fmt: skip
    assert "The UNet runs compiled" not in (out / "train.log").read_text()
    assert steps[1] > steps[0] > 0  # the second invocation trained on from the first's checkpoint
    assert 0 < fractions[0] < 1 and fractions[1] == 1.0  # the 20-second plan ends where the second one does
    assert summary["heldout_loss_high_noise"] > 0 and summary["progress"]["high_noise"]
    assert summary["train_images"] == 14 - 4  # the full copy less the held-out photos
    grids = summary["progress"]["grids"]
    assert [grid["step"] for grid in grids] == sorted(grid["step"] for grid in grids) and grids[-1]["step"] == steps[1]
    assert all(bound["bpd"] > 0 and bound["bpd_stderr"] > 0 for bound in summary["progress"]["bounds"])
    command_line = (out / "command.txt").read_text()
    assert "--ddpm_beta_schedule squaredcos_cap_v2" in command_line
    assert "--resume_from_checkpoint latest" in command_line
    assert summary["heldout_images"] == 4 and summary["bpd_kl_timesteps"] == 3 and summary["bpd"] > 0
    assert 0 <= summary["samples"]["unguided"]["memorization_share"] <= 1
    kept = sorted(int(path.name.split("-")[1]) for path in (out / "run").glob("checkpoint-*"))
    guide_step = int(re.search(r"copied the guide from \S*checkpoint-(\d+)", result.stdout).group(1))
    assert guide_step == min(kept, key=lambda step: abs(step - kept[-1] // 8)) and (out / "run" / "guide").is_dir()
    assert summary["samples"]["guided"]["guidance_scale"] == 2.0 and summary["samples"]["guided"]["pet_fd"] > 0
    for picture in ("samples-dpmsolver-25.png", "samples-ddpm.png", "trajectory.png", "memorization.png",
                    "progress.png", "samples-guided.png"):  # fmt: skip
        assert Image.open(out / "report" / picture).size[0] > 0, picture
    compare_two_outs_of_the_same_data(out, tmp_path)
    sweep_guidance(out, tmp_path)


def sweep_guidance(out, tmp_path):
    """guidance_sweep.py guides the run with one of its own early checkpoints: a sheet and a row per setting."""
    early = sorted((out / "run").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))[0]
    sweep = [sys.executable, str(ROOT / "benchmarks" / "guidance_sweep.py"), str(out / "run"), "--guides",
             str(early), "--scales", "1,2", "--intervals", "5-15", "--num-images", "32",
             "--out", str(tmp_path / "sweep")]  # fmt: skip
    result = subprocess.run(sweep, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [row["setting"] for row in rows] == ["unguided", f"{early.name} W 2", f"{early.name} W 2 t 5-15"]
    assert all(row["pet_fd"] > 0 and row["pet_fd_stderr"] > 0 for row in rows)
    assert Image.open(tmp_path / "sweep" / "sheet.png").size[0] > 3 * 64


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
    assert second["loss_minus_first"] == 0 and second["loss"]["loss"] == first["loss"]["loss"] > 0
    assert {path.name for path in (tmp_path / "compare").glob("*-ddpm-2.png")} == {"pets-run-ddpm-2.png",
                                                                                   "twin-run-ddpm-2.png"}  # fmt: skip
    others = Dataset.from_parquet(str(out / "data" / "full.parquet")).select(range(first["high_noise"]["num_images"]))
    others.to_parquet(twin / "data" / "heldout.parquet")
    result = subprocess.run(compare, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "the runs held out different images" in result.stderr


@pytest.mark.parametrize(("name", "widths", "millions"), [("small-32px", [64, 128, 256], 12.3),
                                                        ("narrow-32px", [32, 64, 128], 3.0),
                                                        ("guide-32px", [16, 32, 64], 0.8)])  # fmt: skip
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


def test_the_speed_benchmarks_run_at_toy_scale(tmp_path):
    data = make_image_folder(tmp_path / "images", count=24, size=(40, 40))
    config = write_tiny_config(tmp_path / "tiny.json")
    toy = (
        f"--model_config_name_or_path {config} --resolution 16 --train_batch_size 4 --ddpm_num_steps 20 "
        "--ddpm_num_inference_steps 10"
    )
    step = [sys.executable, str(ROOT / "benchmarks" / "train_step.py")]
    profiled = subprocess.run([*step, "profile", str(data), "--steps", "3", "--flags", toy], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    assert "% of this CPU's bf16 matmul peak" in profiled.stdout and "| forward, loss and backward |" in profiled.stdout
    assert "| convolutions |" in profiled.stdout and "| EMA |" in profiled.stdout
    convolutions = re.search(r"\| convolutions \| [\d.]+ \| [\d.]+ % \| ([\d.e-]+) \| ([\d.]+) % \|", profiled.stdout)
    assert convolutions and float(convolutions[1]) > 0 and float(convolutions[2]) > 0, profiled.stdout
    assert re.search(r"\| norms \| [\d.]+ \| [\d.]+ % \| - \| - \|", profiled.stdout), profiled.stdout  # no FLOPs
    compared = subprocess.run([*step, "compare", str(data), "--steps", "6", "--rounds", "1", "--configurations",
                               "eager,2proc", "--flags", toy], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "| eager |" in compared.stdout and "| 2proc |" in compared.stdout and "| 1.00 |" in compared.stdout
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--model-config", str(config),
                            "--resolution", "16", "--runs", "1", "--warmup", "1", "--train-batch", "2",
                            "--infer-batch", "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "| train images/s |" in bench.stdout
