"""Faults a long run meets: SIGTERM/SIGINT, a second run on the same folder, a full disk, damaged checkpoints,
and resuming with another setup. Real `accelerate launch` subprocesses, real signals, a real small tmpfs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from pets_diffusion import PetsUNet2DModel
from pets_diffusion.checkpoints import complete_checkpoints, intact_checkpoint
from pets_diffusion.interruption import EXIT_INTERRUPTED
from pets_diffusion.pipeline_folder import save_pipeline
from pets_diffusion.runlock import NOTE_FILE, OutputDirBusy, RunLock
from pets_diffusion.storage import DamagedFolder, DiskFull, verify

from .conftest import TINY_UNET_CONFIG
from .helpers import ACCELERATE, TRAIN_SCRIPT, assert_same_weights, launch, make_workspace, tiny_training_args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("faults"), count=16)


def launch_command(args: list[str], processes: int = 1) -> list[str]:
    if processes > 1:
        launcher = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    else:
        launcher = ["--cpu", "--num_processes", "1"]
    return [str(ACCELERATE), "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", str(TRAIN_SCRIPT), *args]  # fmt: skip


class Run:
    """A training run in the background, in its own process group, its stderr collected as it comes."""

    def __init__(self, command: list[str]):
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.stderr = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: self.process.stderr.read(1), ""):
            self.stderr += chunk

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert self.process.poll() is None, f"the run ended before {text!r}:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in time:\n{self.stderr[-3000:]}"
            time.sleep(0.01)

    def finish(self, timeout: float = 240) -> int:
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code


def read_summary(output: Path) -> dict:
    try:
        return json.loads((output / "train_summary.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return {}


# -- SIGTERM and SIGINT ----------------------------------------------------------------------------------

STEPS = ("--max_train_steps", "40", "--checkpointing_steps", "1000", "--save_images_steps", "1000",
         "--save_model_epochs", "1000")  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(workspace, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight") / "run"
    launch(tiny_training_args(workspace["data"], workspace["config"], output, *STEPS))
    return output


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_at_a_random_step_checkpoints_there_and_resumes_to_identical_weights(
    workspace, straight_run, tmp_path, processes
):
    if processes == 2 and not torch.distributed.is_gloo_available():
        pytest.skip("two CPU processes need torch's gloo backend")
    output = tmp_path / "run"
    step = random.Random(uuid.uuid4().int).randrange(3, 30)
    run = Run(launch_command(tiny_training_args(workspace["data"], workspace["config"], output, *STEPS), processes))
    run.wait_for(f" {step}/40 ")
    os.killpg(run.process.pid, signal.SIGTERM)  # as Slurm and Ctrl-C do: every process of the group
    run.finish()
    stopped = json.loads((output / "train_summary.json").read_text())
    assert stopped["interrupted"]["by"] == "SIGTERM"
    at = stopped["interrupted"]["step"]
    assert step <= at < 40 and [path.name for path in complete_checkpoints(output)] == [f"checkpoint-{at}"]
    assert f"stopped by SIGTERM at step {at}, saved as checkpoint-{at}; resume with" in run.stderr
    assert f"(exit status {EXIT_INTERRUPTED})" in run.stderr
    verify(output / f"checkpoint-{at}")
    launch(tiny_training_args(workspace["data"], workspace["config"], output, *STEPS, "--resume_from_checkpoint",
                              "latest"), processes=processes)  # fmt: skip
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 40 and summary["steps_this_run"] == 40 - at and "interrupted" not in summary
    if processes == 1:
        assert_same_weights(straight_run, output, ("unet",))
    else:
        assert summary["weight_checksums"][0] == summary["weight_checksums"][1]


def test_the_training_process_itself_exits_75_and_signals_while_saving_change_nothing(workspace, tmp_path):
    output = tmp_path / "run"
    run = Run([sys.executable, str(TRAIN_SCRIPT), *tiny_training_args(workspace["data"], workspace["config"], output,
                                                                       *STEPS)])  # fmt: skip
    run.wait_for(" 5/40 ")
    run.process.send_signal(signal.SIGINT)  # Ctrl-C ...
    while run.process.poll() is None:  # ... then SIGTERM and SIGINT, again and again, while it stops and saves
        run.process.send_signal(random.choice([signal.SIGTERM, signal.SIGINT]))
        time.sleep(0.02)
    assert run.finish() == EXIT_INTERRUPTED
    assert "received while stopping: still saving the checkpoint" in run.stderr
    at = json.loads((output / "train_summary.json").read_text())["interrupted"]["step"]
    verify(output / f"checkpoint-{at}")
    assert not list(output.glob(".*partial"))


def test_a_sigterm_to_the_launcher_alone_reaches_the_training_process(workspace, tmp_path):
    """`accelerate launch` on one process does not forward signals; the kernel's parent-death signal does."""
    output = tmp_path / "run"
    run = Run(launch_command(tiny_training_args(workspace["data"], workspace["config"], output, *STEPS)))
    run.wait_for(" 5/40 ")
    run.process.send_signal(signal.SIGTERM)  # the launcher only, as Kubernetes signals a container's first process
    run.finish()
    deadline = time.monotonic() + 120
    while "interrupted" not in read_summary(output):
        assert time.monotonic() < deadline, "the training process did not stop with a checkpoint"
        time.sleep(0.05)
    at = read_summary(output)["interrupted"]["step"]
    verify(output / f"checkpoint-{at}")


# -- two runs on one output folder -----------------------------------------------------------------------


def test_a_second_run_on_a_live_runs_folder_is_refused_at_once_and_the_first_goes_on(workspace, tmp_path):
    output = tmp_path / "run"
    endless = ("--max_train_steps", "100000", "--checkpointing_steps", "100000", "--save_images_steps", "100000",
               "--save_model_epochs", "100000")  # fmt: skip
    first = Run([sys.executable, str(TRAIN_SCRIPT),
                 *tiny_training_args(workspace["data"], workspace["config"], output, *endless)])  # fmt: skip
    first.wait_for(" 3/100000 ")
    arguments_before = (output / "training_args.json").read_bytes()
    second = launch(tiny_training_args(workspace["data"], workspace["config"], output, *STEPS,
                                       "--overwrite_output_dir"), check=False)  # fmt: skip
    errors = [line for line in second.stderr.splitlines() if "error:" in line]
    note = json.loads((output / NOTE_FILE).read_text())
    assert note["pid"] == first.process.pid
    assert errors == [
        f"train_unconditional.py: error: --output_dir {output} is in use by another training run (host "
        f"{note['host']}, PID {note['pid']}, started {note['started']}); wait for it to end, stop it, or choose "
        "another --output_dir."
    ], second.stderr[-2000:]
    assert first.process.poll() is None  # untouched: still training, not emptied by --overwrite_output_dir
    assert (output / "training_args.json").read_bytes() == arguments_before
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == EXIT_INTERRUPTED
    verify(output / f"checkpoint-{read_summary(output)['interrupted']['step']}")
    assert not (output / NOTE_FILE).exists()  # released at the end


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(workspace, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / NOTE_FILE).write_text(json.dumps({"host": "gone", "pid": 4242, "started": "2026-11-29 03:00:00 UTC"}))
    result = launch(tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "2"))
    assert "Taking over" in result.stderr and "host gone, PID 4242, started 2026-11-29 03:00:00 UTC" in result.stderr
    assert read_summary(output)["global_step"] == 2


def test_the_lock_excludes_a_second_holder_in_another_process_and_frees_on_death(tmp_path):
    hold = (
        "import sys, time; from pets_diffusion.runlock import RunLock; lock = RunLock(sys.argv[1]); "
        "lock.acquire(); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputDirBusy, match=f"PID {holder.pid}, started"):
        RunLock(tmp_path).acquire()
    holder.kill()  # SIGKILL: no clean-up at all
    holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # the kernel freed the flock with the process
    lock.release()
    assert not (tmp_path / NOTE_FILE).exists()


def test_releasing_removes_only_a_folder_the_lock_made_and_the_run_left_empty(tmp_path):
    made_and_empty, made_and_written, already_there = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    already_there.mkdir()
    for folder in (made_and_empty, made_and_written, already_there):
        lock = RunLock(folder)
        lock.acquire()
        if folder == made_and_written:
            (folder / "training_args.json").write_text("{}")
        lock.release()
    assert not made_and_empty.exists()
    assert sorted(path.name for path in made_and_written.iterdir()) == [".train.lock", "training_args.json"]
    assert sorted(path.name for path in already_there.iterdir()) == [".train.lock"]


# -- damaged checkpoints and another setup ---------------------------------------------------------------

DAMAGE = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--save_images_steps", "1000")


@pytest.fixture
def three_checkpoints(workspace, tmp_path):
    output = tmp_path / "run"
    launch(tiny_training_args(workspace["data"], workspace["config"], output, *DAMAGE))
    assert [path.name for path in complete_checkpoints(output)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return output


@pytest.mark.parametrize("damage", ["truncated", "missing", "altered", "no-manifest"])
def test_latest_skips_a_damaged_newest_checkpoint_and_naming_it_is_refused(workspace, three_checkpoints, damage):
    output, newest = three_checkpoints, three_checkpoints / "checkpoint-6"
    weights = newest / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":  # copied half-way
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "missing":
        shutil.rmtree(newest / "unet_ema")
    elif damage == "altered":  # a bad disk: same size, one byte flipped
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    expected = {
        "truncated": "checkpoint-6/unet/diffusion_pytorch_model.safetensors has",
        "missing": "checkpoint-6 lacks unet_ema/",
        "altered": "checkpoint-6/unet/diffusion_pytorch_model.safetensors does not match its checksum",
        "no-manifest": "checkpoint-6 has no manifest.json",
    }[damage]
    assert intact_checkpoint(str(output), "latest") == output / "checkpoint-4"
    resumed = launch(tiny_training_args(workspace["data"], workspace["config"], output, *DAMAGE,
                                        "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert f"Skipping damaged {newest}: {expected}" in resumed.stderr
    assert read_summary(output)["steps_this_run"] == 2  # from step 4 to 6
    if damage != "no-manifest":  # checkpoint-6 was rewritten whole by the resumed run; damage it again and name it
        weights.write_bytes(weights.read_bytes()[:100])
        named = launch(tiny_training_args(workspace["data"], workspace["config"], output, *DAMAGE,
                                          "--resume_from_checkpoint", "checkpoint-6"), check=False)  # fmt: skip
        errors = [line for line in named.stderr.splitlines() if "error:" in line]
        assert named.returncode != 0 and len(errors) == 1, named.stderr[-2000:]  # the launcher turns 2 into 1
        assert "error: --resume_from_checkpoint checkpoint-6 is damaged: checkpoint-6/unet/" in errors[0]


def test_a_run_whose_every_checkpoint_is_damaged_is_refused(three_checkpoints):
    for checkpoint in complete_checkpoints(three_checkpoints):
        (checkpoint / "optimizer.bin").unlink()
    with pytest.raises(
        DamagedFolder, match="every checkpoint in .* is damaged .checkpoint-2, checkpoint-4, checkpoint-6"
    ):
        intact_checkpoint(str(three_checkpoints), "latest")


@pytest.mark.parametrize(
    "change, expected",
    [
        (("--train_batch_size", "2"), "train_batch_size 4 -> 2"),
        (("--resolution", "8"), "resolution 16 -> 8"),
        (("--variance_type", "learned_range"), "unet out_channels 3 -> 6; variance_type fixed_small -> learned_range"),
        ("processes", "num_processes 1 -> 2"),
        ("config", "unet block_out_channels [32, 64] -> [32, 32]"),
    ],
)
def test_resuming_with_another_setup_is_refused_in_one_line_before_loading(three_checkpoints, workspace, tmp_path,
                                                                          change, expected):  # fmt: skip
    config = workspace["config"]
    if change == "config":
        config = tmp_path / "other.json"
        config.write_text(json.dumps({**json.loads(workspace["config"].read_text()), "block_out_channels": [32, 32]}))
    extra = change if isinstance(change, tuple) else ()
    args = tiny_training_args(
        workspace["data"], config, three_checkpoints, *DAMAGE, *extra, "--resume_from_checkpoint", "latest"
    )  # fmt: skip  (a repeated flag: the later wins)
    result = launch(args, processes=2 if change == "processes" else 1, check=False)
    errors = [line for line in result.stderr.splitlines() if "error:" in line and "train_unconditional" in line]
    assert result.returncode != 0 and errors, result.stderr[-2000:]
    assert all(line == errors[0] for line in errors)  # the same line from every process
    assert f"error: checkpoint-6 was saved by a run set up otherwise ({expected}" in errors[0], errors[0]
    assert "Resumed from" not in result.stderr


# -- a full disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 48 MiB (the tests run as root in CI); without mount rights, these tests skip, saying so."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}); run as root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free."""
    ballast = folder / "ballast"
    ballast.write_bytes(b"")
    free = shutil.disk_usage(folder).free
    with ballast.open("wb") as stream:
        stream.truncate(0)
        stream.write(b"\0" * max(free - leave, 0))
    return ballast


def test_a_full_disk_while_checkpointing_stops_in_one_line_and_keeps_the_last_checkpoint(workspace, small_disk):
    output = small_disk / "run"
    args = tiny_training_args(workspace["data"], workspace["config"], output, "--max_train_steps", "8",
                              "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                              "--save_images_steps", "1000")  # fmt: skip
    first = Run(launch_command(args))
    first.wait_for("Saved " + str(output / "checkpoint-2"))
    ballast = fill(small_disk, 1 << 20)  # 1 MiB left: the next checkpoint (about 13 MB) cannot fit
    code = first.finish()
    errors = [line for line in first.stderr.splitlines() if "train_unconditional.py: error:" in line]
    assert code != 0 and len(errors) == 1, first.stderr[-3000:]
    assert "may not fit" in first.stderr  # the early warning, before the save
    assert f"error: no space left on device in {output} while saving checkpoint-4: it needs about " in errors[0]
    assert "MB are free; checkpoint-2 and the pipeline are intact. Free space, then resume with" in errors[0]
    assert [path.name for path in complete_checkpoints(output)] == ["checkpoint-2"]
    assert not list(output.glob(".*partial"))  # nothing half-written where latest could pick it up
    verify(output / "checkpoint-2")
    ballast.unlink()  # space freed
    launch([*args, "--resume_from_checkpoint", "latest"])
    assert read_summary(output)["global_step"] == 8 and read_summary(output)["steps_this_run"] == 6


def test_a_full_disk_while_saving_the_pipeline_keeps_the_previous_one(small_disk):
    torch.manual_seed(0)
    old, new = PetsUNet2DModel(**TINY_UNET_CONFIG), PetsUNet2DModel(**TINY_UNET_CONFIG)
    scheduler = DDPMScheduler(num_train_timesteps=50)
    save_pipeline(old, scheduler, str(small_disk))
    fill(small_disk, 200_000)
    message = rf"no space left on device in {small_disk} while saving the pipeline: it needs about [\d.]+ MB, "
    with pytest.raises(DiskFull, match=message + r"0\.\d MB are free; the previous pipeline is intact"):
        save_pipeline(new, scheduler, str(small_disk))
    assert not (small_disk / ".pipeline.partial").exists()
    kept = load_file(str(small_disk / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(kept[name], tensor) for name, tensor in old.state_dict().items())
    reloaded = PetsUNet2DModel.from_pretrained(small_disk, subfolder="unet")  # still loads, as the old model
    assert all(torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in old.state_dict().items())
