"""benchmarks/recipe_runs.sh's pets20 stage at a toy scale: runs two at a time on their own cores, then one
picture of every run's samples, the high-noise loss paired against the base, and the table with what was seen."""

import json
import os
import subprocess
import sys
from pathlib import Path

from datasets import Dataset
from PIL import Image as PILImage

from .helpers import ROOT, write_pets_copy, write_tiny_config


def test_the_pets20_stage_screens_in_pairs_and_compares_by_samples_and_high_noise_loss(tmp_path):
    faithful = [f"pet_{index}.jpg" for index in range(12)]
    data = write_pets_copy(tmp_path / "pets", {"train": faithful}, seed=0)
    more = {"train": [*faithful, "pet_12.jpg", "pet_13.jpg"], "stretched_unsquashed": ["pet_14.jpg", "pet_15.jpg"]}
    full = write_pets_copy(tmp_path / "pets-full", more, seed=1)
    out = tmp_path / "screen"
    config = write_tiny_config(tmp_path / "tiny.json")
    env = {**os.environ, "PYTHON": sys.executable, "FULL": str(full), "SCREEN20_TIME": "3s", "PETS20_HELD_OUT": "4",
           "PETS20_RUNS": "base constant seed1",
           "PETS20_FLAGS": f"--model_config_name_or_path {config} --resolution 16 --train_batch_size 4 "
                           "--ddpm_num_steps 20 --ddpm_num_inference_steps 2 --validation_bpd_timesteps 3",
           "COMPARE_FLAGS": "--nll-timesteps 3 --grids= --sheet --high-noise-from 10 --high-noise-timesteps 4",
           }  # fmt: skip
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "recipe_runs.sh"), str(data), str(out), "pets20"],
                            capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    held_out = Dataset.from_parquet(str(out / "pets20-data" / "heldout.parquet"))["file_name"]
    assert len(held_out) == 4 and set(held_out) < set(faithful)
    train = Dataset.from_parquet(str(out / "pets20-data" / "full.parquet"))["file_name"]
    assert len(train) == 16 - 4 and not set(train) & set(held_out)  # the full copy less the held-out photos
    for name in ("base", "constant", "seed1"):
        args = json.loads((out / f"pets20-{name}" / "training_args.json").read_text())
        summary = json.loads((out / f"pets20-{name}" / "train_summary.json").read_text())
        assert summary["stopped_by_time_budget"] and summary["lr_schedule"]["planned_s"] == 3.0
        assert args["validation_dataset"].endswith("heldout.parquet")
        log = (out / f"pets20-{name}.log").read_text()
        assert "--lr_schedule_time spent" in log
    assert json.loads((out / "pets20-constant" / "training_args.json").read_text())["lr_scheduler"] == (
        "constant_with_warmup"
    )
    # Two at a time: the first pair's runs overlapped in time, each on its own core.
    base, constant = (json.loads((out / f"pets20-{name}" / "train_summary.json").read_text()) for name in
                      ("base", "constant"))  # fmt: skip
    assert base["wall_time_s"] > 0 and constant["wall_time_s"] > 0
    first_log, second_log = ((out / f"pets20-{name}.log").stat() for name in ("base", "constant"))
    third_log = (out / "pets20-seed1.log").stat()
    assert abs(first_log.st_mtime - second_log.st_mtime) < third_log.st_mtime - first_log.st_mtime

    report = json.loads((out / "pets20-compare" / "compare.json").read_text())
    assert [Path(row["run"]).name for row in report] == ["pets20-base", "pets20-constant", "pets20-seed1"]
    assert report[0]["high_noise_minus_first"] == 0 and report[0]["high_noise"]["first_timestep"] == 10
    assert all(row["high_noise_minus_first_stderr"] > 0 for row in report[1:])
    sheet = PILImage.open(out / "pets20-compare" / "sheet.png")
    assert sheet.size[0] > 3 * 8 * 16 and sheet.size[1] > 8 * 16  # three labelled 8x8 grids of 16-pixel samples
    table = (out / "pets20.md").read_text().splitlines()
    assert "loss at high noise" in table[0] and len(table) == 2 + 3
    assert "linear over 0.05 min" in table[2] and "constant_with_warmup over 0.05 min" in table[3]
