"""Reliability: exact resume after SIGKILL, atomic checkpoints, odd and broken images, clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Image
from safetensors.torch import load_file

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.checkpoints import checkpoint_step, complete_checkpoints, prune_checkpoints, resolve_checkpoint
from pets_diffusion.data import TrainingImages, augmentation, decode_rgb, load_image_dataset, prepare_images
from pets_diffusion.options import UsageError, parse_args, validate_args
from pets_diffusion.train import main

from .helpers import (
    ACCELERATE,
    ROOT,
    TINY_CONFIG_JSON,
    TRAIN_SCRIPT,
    assert_same_weights,
    launch,
    make_image_folder,
    make_odd_image_folder,
    make_workspace,
    tiny_training_args,
    write_pets_copy,
    write_tiny_config,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("reliability"), count=16)


# -- exact resume -----------------------------------------------------------------------------------

NO_UNSAFE_TORCH_LOAD = """
import torch
_load = torch.load
def _checked_load(*args, **kwargs):
    if kwargs.get("weights_only", True) is not True:
        raise RuntimeError(f"torch.load called with weights_only={kwargs.get('weights_only')!r}")
    return _load(*args, **kwargs)
torch.load = _checked_load
"""


def test_a_run_killed_with_sigkill_resumes_to_bit_identical_weights(workspace, tmp_path):
    args = ("--max_train_steps", "96", "--checkpointing_steps", "4", "--checkpoints_total_limit", "2",
            "--save_images_steps", "1000", "--post_hoc_ema", "--post_hoc_ema_every", "6")  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch(tiny_training_args(workspace["data"], workspace["config"], straight, *args))

    command = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT),
               *tiny_training_args(workspace["data"], workspace["config"], killed, *args)]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any(step >= 20 for step in saved_steps(killed)) and time.monotonic() < deadline:
        time.sleep(0.01)  # any checkpoint from step 20 on: pruning may already have removed checkpoint-20
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoint-96").exists()  # it really died mid-run

    # The resumed run may only load tensors: every torch.load must be weights_only.
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_UNSAFE_TORCH_LOAD)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])
    try:
        launch(tiny_training_args(workspace["data"], workspace["config"], killed, *args,
                                  "--resume_from_checkpoint", "latest"))  # fmt: skip
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["global_step"] == 96 and 0 < summary["steps_this_run"] <= 76
    assert_same_weights(straight, killed, ("unet", "checkpoint-96/unet", "checkpoint-96/unet_ema"))
    # The post-hoc EMA snapshots, every 6 steps (never on a checkpoint's step but at 12, 24, ...), bit for bit.
    snapshots = sorted(path.name for path in (straight / "post_hoc_ema").iterdir())
    assert len(snapshots) == 2 * 16 and snapshots == sorted(path.name for path in (killed / "post_hoc_ema").iterdir())
    for name in [*(f"post_hoc_ema/{name}" for name in snapshots), "checkpoint-96/post_hoc_ema.safetensors"]:
        assert (straight / name).read_bytes() == (killed / name).read_bytes(), name


def test_a_two_process_checkpoint_resumes_with_two_processes(workspace, tmp_path):
    args = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--save_images_steps", "1000")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(tiny_training_args(workspace["data"], workspace["config"], straight, *args), processes=2)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "unet")
    launch(tiny_training_args(workspace["data"], workspace["config"], resumed, *args, "--resume_from_checkpoint",
                              "latest"), processes=2)  # fmt: skip
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4 and summary["steps_this_run"] == 2
    assert summary["weight_checksums"][0] == summary["weight_checksums"][1]
    assert_same_weights(straight, resumed, ("unet", "checkpoint-4/unet", "checkpoint-4/unet_ema"))


def saved_steps(output: Path) -> list[int]:
    return [checkpoint_step(path) for path in complete_checkpoints(output)]


# -- atomic checkpoints ---------------------------------------------------------------------------


def _fake_checkpoints(output: Path, steps: list[int]) -> None:
    for step in steps:
        (output / f"checkpoint-{step}").mkdir(parents=True)


def test_latest_never_picks_an_incomplete_checkpoint(tmp_path):
    _fake_checkpoints(tmp_path, [2, 10, 4])
    (tmp_path / ".checkpoint-12.partial").mkdir()  # a crash while saving step 12
    (tmp_path / "checkpoint-notes").mkdir()
    assert resolve_checkpoint(str(tmp_path), "latest") == tmp_path / "checkpoint-10"
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert resolve_checkpoint(str(tmp_path / "empty"), "latest") is None


def test_pruning_keeps_the_newest_and_the_resumed_from_checkpoint(tmp_path):
    _fake_checkpoints(tmp_path, [2, 4, 6, 8])
    prune_checkpoints(tmp_path, total_limit=2, protected=tmp_path / "checkpoint-2")
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    prune_checkpoints(tmp_path, total_limit=1, protected=tmp_path / "checkpoint-2")
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    prune_checkpoints(tmp_path, total_limit=1)
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-8"]


def test_pruning_under_the_guard_always_keeps_a_checkpoint_from_before_its_lookback(tmp_path):
    lookback = 7  # a trip at step s may roll back to the newest checkpoint at or before s - lookback
    for step in range(5, 100, 5):  # a checkpoint every 5 steps, --checkpoints_total_limit 1
        _fake_checkpoints(tmp_path, [step])
        prune_checkpoints(tmp_path, total_limit=1, keep_at_or_before=step - lookback)
        kept = [checkpoint_step(path) for path in complete_checkpoints(tmp_path)]
        for trip in range(step, step + 5):  # every step until the next save can find its checkpoint
            assert trip - lookback < 5 or any(at <= trip - lookback for at in kept), (step, trip, kept)
        assert len(kept) <= 1 + lookback // 5 + 1  # the limit, exceeded only by the lookback's checkpoints


def test_without_the_guard_a_nan_loss_stops_clearly_and_keeps_the_last_good_checkpoint(workspace, tmp_path):
    output = tmp_path / "nan"  # with the guard (the default) tests/test_divergence.py's rollbacks take over
    result = launch(
        tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "20",
                           "--checkpointing_steps", "1", "--learning_rate", "1e30", "--lr_scheduler", "constant",
                           "--save_images_steps", "1000", "--max_grad_norm", "1e30", "--no-divergence_guard"),
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: the loss became" in result.stderr and "last good checkpoint is kept" in result.stderr
    assert (
        str(ROOT / "pets_diffusion") not in result.stderr
    )  # no traceback through our code (the launcher adds its own)
    checkpoints = complete_checkpoints(output)
    assert checkpoints, "no checkpoint survived"
    step = int(checkpoints[-1].name.split("-")[1])
    assert step < 20 and f"at step {step + 1}" in result.stderr
    weights = load_file(checkpoints[-1] / "unet" / "diffusion_pytorch_model.safetensors")
    assert not (output / "model_index.json").exists()
    # The kept checkpoint is good: every weight of the model, all of them finite.
    assert weights.keys() == PetsUNet2DModel(**TINY_CONFIG_JSON, sample_size=16).state_dict().keys()
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


# -- broken and odd data --------------------------------------------------------------------------


def test_odd_images_become_rgb_and_broken_ones_are_skipped_by_name(tmp_path):
    readable, broken = make_odd_image_folder(tmp_path / "odd")
    images, skipped = prepare_images(load_image_dataset(train_data_dir=str(tmp_path / "odd")), "image", 16)
    assert sorted(skipped) == sorted(broken)
    assert len(images) == len(readable)
    assert all(image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) == 16 for image in images)
    sixteen_bit = decode_rgb({"path": str(tmp_path / "odd" / "sixteen_bit.png"), "bytes": None})
    assert sixteen_bit.mode == "RGB" and 30 < np.asarray(sixteen_bit).std() < 120
    rgba = decode_rgb({"path": str(tmp_path / "odd" / "rgba_png_named.jpg"), "bytes": None})
    assert rgba.mode == "RGB"


def test_broken_images_in_a_parquet_source_are_skipped(tmp_path):
    readable, broken = make_odd_image_folder(tmp_path / "odd")
    rows = [{"bytes": path.read_bytes(), "path": path.name} for path in sorted((tmp_path / "odd").iterdir())]
    Dataset.from_dict({"image": rows}).cast_column("image", Image(decode=False)).to_parquet(tmp_path / "odd.parquet")
    images, skipped = prepare_images(load_image_dataset(str(tmp_path / "odd.parquet")), "image", 16)
    assert sorted(skipped) == sorted(broken) and len(images) == len(readable)


def test_a_dataset_folder_rewritten_in_place_or_named_like_another_loads_its_own_images(tmp_path):
    # `datasets` caches a README-configured folder under its name alone; the files must decide what loads.
    def written(folder):
        table = Dataset.from_parquet(str(folder / "data" / "train-00000.parquet"))
        return [row["bytes"] for row in table.cast_column("image", Image(decode=False))["image"]]

    def loaded(folder):
        return [row["bytes"] for row in load_image_dataset(str(folder))["image"]]

    first = write_pets_copy(tmp_path / "a" / "pets", {"train": ["p0.jpg", "p1.jpg"]}, seed=0)
    assert loaded(first) == written(first) and len(written(first)) == 2
    other = write_pets_copy(tmp_path / "b" / "pets", {"train": ["q0.jpg", "q1.jpg", "q2.jpg"]}, seed=1)
    assert loaded(other) == written(other) and len(written(other)) == 3
    shutil.rmtree(first)
    write_pets_copy(first, {"train": ["r0.jpg", "r1.jpg", "r2.jpg", "r3.jpg"]}, seed=2)
    assert loaded(first) == written(first) and len(written(first)) == 4


def test_training_goes_on_past_broken_images_and_says_which(workspace, tmp_path):
    make_odd_image_folder(tmp_path / "odd")
    output = tmp_path / "run"
    result = launch(tiny_training_args(tmp_path / "odd", workspace["config"], output, "--max_train_steps", "3",
                                       "--save_images_steps", "1000", "--checkpointing_steps", "1000"))  # fmt: skip
    assert "Skipped 3 unreadable image(s): empty.jpg, text.jpg, truncated.jpg" in result.stderr
    summary = json.loads((output / "train_summary.json").read_text())
    assert sorted(summary["skipped_images"]) == ["empty.jpg", "text.jpg", "truncated.jpg"]
    assert summary["global_step"] == 3 and summary["train_images"] == 9


# -- clear errors before any heavy work -----------------------------------------------------------


def bad_arguments(tmp_path: Path, *args: str) -> tuple[list[str], Path]:
    """A fast tiny run's flags with `args` added, and the output dir it would write."""
    output = tmp_path / "out"
    data = make_image_folder(tmp_path / "data", count=2)
    config = write_tiny_config(tmp_path / "tiny.json")
    full = tiny_training_args(data, config, output, "--max_train_steps", "1", *args)
    if "--dataset_name" in args:  # read the dataset named, not the image folder
        at = full.index("--train_data_dir")
        del full[at : at + 2]
    return full, output


def single_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("train_unconditional.py: error: ")
    return lines[0]


def bad_run(tmp_path: Path, *args: str) -> tuple[str, Path]:
    """Run train_unconditional.py with bad arguments; return its single error line and output dir."""
    full, output = bad_arguments(tmp_path, *args)
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *full], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    return single_error_line(result.stderr), output  # one line: nothing was loaded or built before it


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--resolution", "18"), "--resolution 18 is not a multiple of 4"),
        (("--resolution", "32"), "tiny.json at --resolution 32: attention_resolutions names 8, but the levels run at"),
        (("--validation_dataset", "/nonexistent/held.parquet"), "--validation_dataset /nonexistent/held.parquet does"),
        (("--ddpm_num_inference_steps", "50"), "--ddpm_num_inference_steps 50 is more than --ddpm_num_steps 20"),
        (("--max_train_time", "0"), "argument --max_train_time: must be longer than zero, got '0'"),
        (("--max_train_time", "soon"), "argument --max_train_time: 'soon' is not a duration; write e.g. 90s, 20m"),
        (("--train_data_dir", "/nonexistent/images"), "--train_data_dir /nonexistent/images is not a folder"),
        (("--resume_from_checkpoint", "checkpoint-99"), "--resume_from_checkpoint checkpoint-99 is not a checkpoint"),
        (("--train_batch_size", "0"), "argument --train_batch_size: must be at least 1, got 0"),
        (("--checkpointing_steps", "-5"), "argument --checkpointing_steps: must be at least 1, got -5"),
        (("--dataloader_num_workers", "-1"), "argument --dataloader_num_workers: must be at least 0, got -1"),
        (("--seed", "4294967296"), "argument --seed: must be at most 4294967295, got 4294967296"),
        (("--learning_rate", "0"), "argument --learning_rate: must be in (0, inf), got 0"),
        (("--adam_beta2", "1"), "argument --adam_beta2: must be in [0, 1), got 1"),
        (("--ema_max_decay", "nan"), "argument --ema_max_decay: must be in [0, 1], got nan"),
        (("--mixed_precision", "fp16"), "--mixed_precision fp16 needs a CUDA GPU"),
        (("--prediction_type", "noise"), "argument --prediction_type: invalid choice: 'noise'"),
        (("--lr_scheduler", "warmup"), "argument --lr_scheduler: invalid choice: 'warmup'"),
        (("--ddpm_beta_schedule", "cubic"), "argument --ddpm_beta_schedule: invalid choice: 'cubic'"),
        (("--vlb_weight", "0.01"), "--vlb_weight weighs the bound a learned variance trains on; add --variance_type"),
        (("--variance_type", "learned"), "argument --variance_type: invalid choice: 'learned'"),
        (("--model_config_name_or_path", "/nonexistent/config.json"), "/nonexistent/config.json does not exist"),
        (("--validation_dataset", ""), "--validation_dataset is empty; give a folder of images"),
        (("--lr_schedule_time", "0s"), "argument --lr_schedule_time: must be longer than zero, got '0s'"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys, args, expected):
    """In process (the script's own entry point, minus the interpreter start): the subprocess tests below cover that."""
    if args[0] == "--mixed_precision" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a machine with a GPU")
    full, output = bad_arguments(tmp_path, *args)
    with pytest.raises(SystemExit) as exited:
        main(full)
    assert exited.value.code == 2
    assert expected in single_error_line(capsys.readouterr().err)
    assert not output.exists()


def test_holding_out_every_image_is_refused_before_anything_is_written(tmp_path, capsys):
    full, output = bad_arguments(tmp_path, "--validation_images", "2")
    with pytest.raises(SystemExit) as exited:
        main(full)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error:" in line]  # after datasets' loading progress bar
    assert exited.value.code == 2 and "Traceback" not in stderr
    assert errors == [
        "train_unconditional.py: error: --validation_images 2 leaves no training images (the dataset has 2); "
        "hold out fewer."
    ]
    assert not output.exists()


def test_logger_wandb_without_wandb_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec("wandb") is None
    args = parse_args(["--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--logger", "wandb"])
    with pytest.raises(UsageError, match=r"--logger wandb needs the wandb package: pip install wandb"):
        validate_args(args)


def test_a_resume_folder_not_named_checkpoint_step_is_refused(tmp_path):
    (tmp_path / "my-copy").mkdir()
    message, output = bad_run(tmp_path, "--resume_from_checkpoint", str(tmp_path / "my-copy"))
    assert "is not a checkpoint folder" in message and "checkpoint-<step>" in message
    assert not output.exists()


def test_a_missing_dataset_path_or_name_fails_in_one_line(tmp_path):
    message, output = bad_run(tmp_path, "--dataset_name", str(tmp_path / "missing.parquet"))
    assert "does not exist" in message
    message, output = bad_run(tmp_path, "--dataset_name", "nobody/no-such-dataset")
    assert "cannot load the dataset nobody/no-such-dataset" in message
    assert not output.exists()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    message, _ = bad_run(tmp_path, "--output_dir", str(tmp_path / "file"))
    assert "is a file" in message


def test_an_unwritable_output_dir_is_refused(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    # Root writes through file modes, so for root use a read-only kernel folder instead.
    candidates = [tmp_path / "locked", Path("/proc/sys"), Path("/sys")]
    unwritable = next((path for path in candidates if path.is_dir() and not os.access(path, os.W_OK)), None)
    if unwritable is None:
        pytest.skip("this machine has no folder this user cannot write to")
    message, _ = bad_run(tmp_path, "--output_dir", str(unwritable / "pets-out"))
    assert "not writable" in message


def test_augmentation_depends_on_seed_epoch_and_index_only():
    images = [torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8) for _ in range(4)]
    data = TrainingImages(images, augmentation(32), seed=7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = data[5]["input"]  # image 1 as drawn in epoch 1
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    torch.manual_seed(123)
    assert torch.equal(data[5]["input"], first)
    assert not torch.equal(data[1]["input"], first)  # the same image in epoch 0: another crop or flip
    assert not torch.equal(TrainingImages(images, augmentation(32), seed=8)[5]["input"], first)


def test_checkpoints_grids_and_snapshots_do_not_change_the_training(workspace, tmp_path):
    """What a run saves along the way draws nothing from the training's random streams: with a checkpoint, a sample
    grid and post-hoc EMA snapshots every few steps, it ends with the weights of a run that saved none."""
    base = ("--max_train_steps", "10", "--save_model_epochs", "1000")
    plain, busy = tmp_path / "plain", tmp_path / "busy"
    launch(tiny_training_args(workspace["data"], workspace["config"], plain, *base, "--checkpointing_steps", "1000",
                              "--save_images_steps", "1000"))  # fmt: skip
    launch(tiny_training_args(workspace["data"], workspace["config"], busy, *base, "--checkpointing_steps", "3",
                              "--save_images_steps", "2", "--post_hoc_ema", "--post_hoc_ema_every", "2"))  # fmt: skip
    assert len(complete_checkpoints(busy)) == 3 and len(list((busy / "samples").iterdir())) == 5
    assert_same_weights(plain, busy, ("unet",))


def test_a_dataset_name_and_an_image_folder_together_are_refused_in_one_line(tmp_path):
    message, output = bad_run(tmp_path, "--dataset_name", "some/dataset", "--train_data_dir", str(tmp_path))
    assert "name two datasets; give one of them" in message
    assert not output.exists()


def test_an_empty_dataset_name_a_missing_path_or_a_folder_without_images_fails_in_one_line(tmp_path):
    """As `--dataset_name "$(realpath ../missing)"` becomes on a clone with nothing beside it: an empty name."""
    message, output = bad_run(tmp_path, "--dataset_name", "")
    assert "--dataset_name is empty; give a folder of images, a dataset folder" in message
    assert "examples/pets-sample" in message
    message, _ = bad_run(tmp_path, "--train_data_dir", "")
    assert "--train_data_dir is empty" in message
    message, _ = bad_run(tmp_path, "--dataset_name", str(tmp_path / "no-such-folder" / "pets"))
    assert "does not exist; give a folder of images" in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here\n")
    for flag in ("--dataset_name", "--train_data_dir"):
        message, _ = bad_run(tmp_path, flag, str(tmp_path / "empty"))
        assert f"cannot load the dataset {tmp_path / 'empty'}" in message and "give a folder of images" in message
    assert not output.exists()
