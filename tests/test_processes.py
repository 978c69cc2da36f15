"""What differs with several processes: two gloo processes under a real `accelerate launch`, without --seed."""

import json
import os

import pytest

from .helpers import ROOT, launch, make_image_folder, tiny_training_args, write_tiny_config

PROBE = ROOT / "tests" / "rank_probe.py"


def probe(tmp_path, name: str, flags: list[str]) -> list[dict]:
    """What each of two processes holds for these flags (tests/rank_probe.py), rank 0 first."""
    out = tmp_path / name
    launch([str(out), *flags], processes=2, script=PROBE)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def test_two_processes_without_a_seed_share_the_split_and_the_order_and_draw_their_own_noise(tmp_path):
    # 20 images, 4 held out: 16 to train on, 2 steps of 4 images on each of 2 processes an epoch.
    data = make_image_folder(tmp_path / "images", count=20)
    config = write_tiny_config(tmp_path / "tiny.json")
    output = tmp_path / "run"
    flags = tiny_training_args(data, config, output, "--validation_images", "4", seed=None)
    first, second = probe(tmp_path, "probe", flags)
    assert first["seed"] == second["seed"]  # one seed, drawn on the main process and sent
    assert first["held_out"] == second["held_out"] and len(first["held_out"]) == 4
    training = set(range(20)) - set(first["held_out"])
    for epoch in (0, 1):
        shards = first["epochs"][epoch], second["epochs"][epoch]
        assert sorted(shards[0] + shards[1]) == sorted(training)  # each training image once an epoch, none held out
        assert not set(shards[0]) & set(shards[1])
    assert first["epochs"][0] != first["epochs"][1]  # a new order each epoch
    # Each process noises its shard with its own ε and t.
    assert first["x_t"] != second["x_t"] and first["t"] != second["t"]


def unseeded_two_step_run(tmp_path):
    """A two-process run without --seed, 4 of its 20 images held out, checkpointed at its last step (2)."""
    data = make_image_folder(tmp_path / "images", count=20)
    output = tmp_path / "run"
    flags = tiny_training_args(data, write_tiny_config(tmp_path / "tiny.json"), output, "--validation_images", "4",
                               "--save_images_steps", "100", "--checkpointing_steps", "2", seed=None)  # fmt: skip
    launch([*flags, "--max_train_steps", "2"], processes=2)
    return flags, output


def test_an_unseeded_two_process_run_resumes_with_its_recorded_seed_and_split(tmp_path):
    flags, output = unseeded_two_step_run(tmp_path)
    held_out = (output / "validation_images.json").read_text()
    seed = json.loads((output / "training_args.json").read_text())["seed"]
    assert isinstance(seed, int)  # the drawn seed is recorded
    resumed = probe(tmp_path, "resumed", [*flags, "--resume_from_checkpoint", "latest"])
    assert [rank["seed"] for rank in resumed] == [seed, seed]
    assert resumed[0]["held_out"] == json.loads(held_out)["held_out_indices"]
    launch([*flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], processes=2)
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 4
    assert (output / "validation_images.json").read_text() == held_out  # the same images stay held out
    refused = launch([*flags, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--seed", str(seed + 1)],
                     processes=2, check=False)  # fmt: skip
    assert refused.returncode != 0  # each process exits 2; the launcher reports the failure
    assert f"the checkpoint was trained with seed {seed}" in refused.stderr
    assert f"resume with --seed {seed} or without --seed" in refused.stderr


# Make the main process (RANK 0) slow at one place for a real two-process run: sitecustomize runs before the script
# imports the training loop, which then takes the slowed function.
SLOW_MAIN_PROCESS = """
import os, time
import {module} as module
original = module.{name}
def slowed(*args, **kwargs):
    if os.environ.get("RANK") == "0" and not getattr(slowed, "done", False):
        slowed.done = True
        time.sleep({seconds})
    return original(*args, **kwargs)
module.{name} = slowed
"""


@pytest.mark.parametrize(
    "module, name, survives",
    [
        ("pets_diffusion.pipeline_folder", "save_pipeline", True),  # the main process saves alone: others outwait it
        ("pets_diffusion.checkpoints", "write_manifest", True),  # it hashes a checkpoint's files alone: likewise
        ("pets_diffusion.objective", "diffusion_loss", False),  # a training collective: --ddp_timeout holds
    ],
)
def test_other_processes_outwait_a_long_save_while_training_collectives_keep_the_timeout(tmp_path, module, name,
                                                                                         survives):  # fmt: skip
    data = make_image_folder(tmp_path / "images", count=8)
    env = with_sitecustomize(tmp_path, SLOW_MAIN_PROCESS.format(module=module, name=name, seconds=30))
    output = tmp_path / "run"
    config = write_tiny_config(tmp_path / "tiny.json")
    flags = tiny_training_args(data, config, output, "--max_train_steps", "2", "--save_images_steps", "1000",
                               "--checkpointing_steps", "2", "--ddp_timeout", "10")  # fmt: skip
    result = launch(flags, processes=2, env=env, check=False)
    if survives:  # 30 s of saving on the main process, 3x the timeout of a collective
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((output / "train_summary.json").read_text())["global_step"] == 2
    else:
        assert result.returncode != 0 and "Timed out" in result.stderr, result.stderr[-3000:]


def with_sitecustomize(tmp_path, code: str) -> dict:
    """An environment whose Python runs `code` at start-up (a sitecustomize module), before the script's imports."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(code)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}


# The first gloo group that pets-diffusion makes itself cannot connect on one process (as on a host whose name
# resolves to 127.0.1.1 in a multi-node run, where it would hang instead): rank 1's first new_group fails.
FAILING_GLOO_GROUP = """
import os
import torch.distributed as dist
original = dist.new_group
def failing(*args, **kwargs):
    if os.environ.get("RANK") == "1" and kwargs.get("backend") == "gloo" and not getattr(failing, "done", False):
        failing.done = True
        raise RuntimeError("Connection refused (a gloo group that cannot connect)")
    return original(*args, **kwargs)
dist.new_group = failing
"""


def test_a_gloo_group_that_cannot_connect_falls_back_to_the_runs_own_waits_on_every_process(tmp_path):
    data = make_image_folder(tmp_path / "images", count=8)
    output = tmp_path / "run"
    flags = tiny_training_args(data, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "2",
                               "--save_images_steps", "2", "--checkpointing_steps", "1",
                               "--ddp_timeout", "20")  # fmt: skip
    result = launch(flags, processes=2, env=with_sitecustomize(tmp_path, FAILING_GLOO_GROUP), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No gloo group for long waits (RuntimeError: Connection refused" in result.stderr
    assert result.stderr.count("No gloo group for long waits") == 2  # rank 0 falls back too: both wait alike
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 2


def test_the_largest_seed_trains_on_two_processes_each_with_its_own_noise(tmp_path):
    data = make_image_folder(tmp_path / "images", count=8)
    config = write_tiny_config(tmp_path / "tiny.json")
    flags = tiny_training_args(data, config, tmp_path / "run", "--validation_images", "2", seed=2**32 - 1)
    first, second = probe(tmp_path, "largest-seed", flags)  # rank 1's noise seed wraps round to 0
    assert first["seed"] == second["seed"] == 2**32 - 1 and first["x_t"] != second["x_t"]


def test_a_checkpoint_saved_before_seeds_were_recorded_resumes_only_with_its_seed(tmp_path):
    flags, output = unseeded_two_step_run(tmp_path)
    seed = json.loads((output / "training_args.json").read_text())["seed"]
    held_out = json.loads((output / "validation_images.json").read_text())["held_out_indices"]
    # As an older version saved it: no seed in the checkpoint's manifest, none in training_args.json.
    manifest_path = output / "checkpoint-2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["run"]["seed"]
    manifest_path.write_text(json.dumps(manifest))
    args = json.loads((output / "training_args.json").read_text())
    (output / "training_args.json").write_text(json.dumps({**args, "seed": None}))
    refused = launch([*flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"], processes=2,
                     check=False)  # fmt: skip
    assert refused.returncode != 0  # each process exits 2; the launcher reports the failure
    assert "checkpoint-2 was saved before checkpoints recorded the run's seed" in refused.stderr
    assert "resume with the --seed the run was trained with" in refused.stderr
    resumed = probe(tmp_path, "legacy", [*flags, "--resume_from_checkpoint", "latest", "--seed", str(seed)])
    assert resumed[0]["seed"] == seed and resumed[0]["held_out"] == held_out  # the same images stay held out
