"""Pushing to and loading from a Hub: the real huggingface_hub client against a local Hub server."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from pets_diffusion import PetsUNet2DModel, sampling
from pets_diffusion.hardware import describe_cpu
from pets_diffusion.hub import export_for_hub

from .hub_helpers import LOAD_WITH_ONLY_DIFFUSERS, hub_env, training_output_folder

PETS_DIFFUSION = Path(sys.executable).with_name("pets-diffusion")
EXPECTED_REPO_FILES = {
    "README.md",
    "loss_curve.png",
    "model_index.json",
    "samples.png",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/pets_unet.py",
}


@pytest.fixture(scope="module")
def training_output(tmp_path_factory):
    return training_output_folder(tmp_path_factory.mktemp("run"))


def push(hub, tmp_path, output, repo_id, *extra) -> subprocess.CompletedProcess:
    command = [str(PETS_DIFFUSION), "push", str(output), "--repo-id", repo_id, *extra]
    return subprocess.run(command, env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=120)


def test_push_then_load_with_only_diffusers(hub, training_output, tmp_path):
    result = push(hub, tmp_path, training_output, "tester/pets-ddpm", "--private")
    assert result.returncode == 0, result.stderr
    assert "pushed" in result.stdout
    repo = hub.state.repos["tester/pets-ddpm"]
    assert repo.private and len(repo.commits) == 1
    assert set(repo.branches["main"]) == EXPECTED_REPO_FILES
    assert_card_samples_are_the_shipped_weights(repo.branches["main"], tmp_path / "download")
    model_index = json.loads(repo.branches["main"]["model_index.json"])
    assert model_index["unet"] == ["pets_unet", "PetsUNet2DModel"]
    unet_source = Path(sys.modules[PetsUNet2DModel.__module__].__file__).read_bytes()
    assert repo.branches["main"]["unet/pets_unet.py"] == unet_source
    # The local output is left as it was: it still loads with the package's class.
    assert json.loads((training_output / "model_index.json").read_text())["unet"][0] == "pets_diffusion.unet"

    load = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_ONLY_DIFFUSERS, "tester/pets-ddpm"],
        env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert load.returncode == 0, load.stderr[-3000:]
    assert "sampled 2" in load.stdout
    assert "Expected types" not in load.stderr  # the remote-code class is a UNet2DModel to DDPMPipeline too


LEARNED_VARIANCE_WITH_ONLY_DIFFUSERS = """
import sys
sys.modules["pets_diffusion"] = None  # this process cannot import pets_diffusion
import numpy, torch
from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler
pipeline = DDPMPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipeline.set_progress_bar_config(disable=True)
assert pipeline.scheduler.config.variance_type == "learned_range" and pipeline.unet.config.out_channels == 6
def draw(steps):
    generator = torch.Generator().manual_seed(0)
    return pipeline(batch_size=2, num_inference_steps=steps, generator=generator, output_type="np").images
numpy.save(sys.argv[2], draw(10))  # DDPM respaced to 10 of 20 steps, with the learned variances
original = pipeline.scheduler
pipeline.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
assert numpy.isfinite(draw(5)).all()
pipeline.scheduler = DDIMScheduler.from_config(original.config)
try:
    draw(5)
except RuntimeError as error:  # DDIM's step does not split the variance channels off: an error, not garbage
    assert "size of tensor a (3) must match the size of tensor b (6)" in str(error), error
    print("ddim refused")
else:
    raise SystemExit("DDIMScheduler sampled a learned-variance model")
"""


def test_a_learned_variance_model_trains_pushes_and_samples_with_only_diffusers(hub, tmp_path):
    from .helpers import launch, make_image_folder, tiny_training_args, write_tiny_config

    output = tmp_path / "learned"
    data = make_image_folder(tmp_path / "images", count=8)
    launch(tiny_training_args(data, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "3",
                              "--save_images_steps", "3", "--checkpointing_steps", "100",
                              "--variance_type", "learned_range", "--vlb_weight", "0.01"))  # fmt: skip
    assert json.loads((output / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    assert json.loads((output / "unet" / "config.json").read_text())["out_channels"] == 6
    assert json.loads((output / "train_summary.json").read_text())["variance_type"] == "learned_range"
    assert (output / "samples" / "step-0000003.png").is_file()  # the training grid samples with the variances
    assert push(hub, tmp_path, output, "tester/learned").returncode == 0
    card = hub.state.repos["tester/learned"].branches["main"]["README.md"].decode()
    assert "learned (`learned_range`, improved DDPM" in card and "L_simple + 0.01 L_vlb" in card
    assert "DDIMScheduler` does not split the variance channels off" in card

    load = subprocess.run(
        [sys.executable, "-c", LEARNED_VARIANCE_WITH_ONLY_DIFFUSERS, "tester/learned", str(tmp_path / "ddpm10")],
        env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert load.returncode == 0, load.stderr[-3000:]
    assert "ddim refused" in load.stdout
    # Plain diffusers drew what pets-diffusion draws; with the variances fixed instead, the images differ.
    unet = PetsUNet2DModel.from_pretrained(output / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(output / "scheduler")

    def draw(scheduler):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return sampling.to_numpy(sampling.denoise(unet, scheduler, sampling.initial_noise(unet, 2, generator),
                                                      10, generator))  # fmt: skip

    ours = draw(scheduler)
    np.testing.assert_allclose(np.load(tmp_path / "ddpm10.npy"), ours, atol=1e-5)
    assert np.abs(draw(DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")) - ours).max() > 1e-3


def test_loading_without_trust_remote_code_is_refused_by_diffusers(hub, training_output, tmp_path):
    assert push(hub, tmp_path, training_output, "tester/refuse-me").returncode == 0
    code = "import sys; from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained(sys.argv[1])"
    load = subprocess.run(
        [sys.executable, "-c", code, "tester/refuse-me"], env=hub_env(hub, tmp_path), capture_output=True,
        text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert load.returncode != 0
    assert "trust_remote_code" in load.stderr


def test_the_model_card_is_complete_and_its_images_exist(hub, training_output, tmp_path):
    assert push(hub, tmp_path, training_output, "tester/card").returncode == 0
    files = hub.state.repos["tester/card"].branches["main"]
    card = files["README.md"].decode()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["library_name"] == "diffusers"
    assert front_matter["license"] == "cc-by-sa-4.0"
    assert front_matter["pipeline_tag"] == "unconditional-image-generation"
    assert front_matter["datasets"] == ["pcuenq/oxford-pets"]
    assert {"unconditional-image-generation", "diffusers", "pytorch", "ddpm"} <= set(front_matter["tags"])
    for fact in ("tester/card", "trust_remote_code=True", "DPMSolverMultistepScheduler", "32 → 32", "32×32",
                 "7349 images", "1 unreadable image", "2 × NVIDIA H100", "1 h 2 min", "bf16", "0.0001",
                 "CC BY-SA 4.0", "Parkhi", "unet/pets_unet.py"):  # fmt: skip
        assert fact in card, fact
    referenced = re.findall(r"!\[[^\]]*\]\(\./([^)]+)\)", card)
    assert sorted(referenced) == ["loss_curve.png", "samples.png"]
    assert all(name in files for name in referenced)
    assert "{{" not in card


def test_a_card_draws_its_samples_from_the_shipped_weights_and_shows_no_missing_loss_curve(training_output, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(training_output, plain, ignore=shutil.ignore_patterns("samples", "loss_curve.png", "checkpoint-*"))
    export_dir = export_for_hub(plain, tmp_path / "export", "tester/plain")
    card = (export_dir / "README.md").read_text()
    assert re.findall(r"!\[[^\]]*\]\(\./([^)]*)\)", card) == ["samples.png"]
    assert "samples drawn from these weights when the card was written: DPM-Solver++, 25 steps, seed 0" in card
    assert "{%" not in card and "{{" not in card


def card_grid(pipeline_dir: Path) -> np.ndarray:
    """The card's grid drawn again from a pipeline folder's weights, as hub.CARD_SAMPLES says, without hub's code."""
    from pets_diffusion.pipeline_folder import load_sampling_model

    unet, _ = load_sampling_model(str(pipeline_dir), "cpu", "float32")
    config = DDPMScheduler.load_config(pipeline_dir, subfolder="scheduler")
    steps = min(25, config["num_train_timesteps"] - 1)  # DPM-Solver++ takes at most T - 1 steps of a toy schedule
    images = sampling.sample(unet, sampling.make_scheduler("dpmsolver", config), 16, steps, seed=0)
    return np.asarray(sampling.grid(images))


def assert_card_samples_are_the_shipped_weights(files: dict, folder: Path) -> None:
    """Write the pushed repo's files to `folder`, draw the card's grid from its weights: the same pixels."""
    from PIL import Image

    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    index = json.loads(files["model_index.json"])
    local = {key: ["pets_diffusion.unet", "PetsUNet2DModel"] for key in ("unet", "guide") if key in index}
    (folder / "model_index.json").write_text(json.dumps(index | local))  # the package's class, not remote code
    assert np.array_equal(np.asarray(Image.open(folder / "samples.png")), card_grid(folder))


def test_sample_command_and_package_load_from_the_hub(hub, training_output, tmp_path):
    assert push(hub, tmp_path, training_output, "tester/sample-me").returncode == 0
    env = hub_env(hub, tmp_path)
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [str(PETS_DIFFUSION), "sample", "tester/sample-me", "--num-images", "4", "--steps", "2", "--out", str(grid)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    assert Image.open(grid).size == (128, 128)
    code = (
        "import sys, pets_diffusion; from diffusers import DDPMPipeline; "
        "p = DDPMPipeline.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "print(p(batch_size=1, num_inference_steps=2).images[0].size)"
    )
    load = subprocess.run([sys.executable, "-c", code, "tester/sample-me"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert load.returncode == 0, load.stderr[-3000:]
    assert "(64, 64)" in load.stdout


def test_a_second_push_is_one_more_commit_on_a_branch(hub, training_output, tmp_path):
    assert push(hub, tmp_path, training_output, "tester/branchy").returncode == 0
    result = push(hub, tmp_path, training_output, "tester/branchy", "--revision", "v2", "--commit-message", "v2")
    assert result.returncode == 0, result.stderr
    repo = hub.state.repos["tester/branchy"]
    assert len(repo.commits) == 2
    assert set(repo.branches["v2"]) == EXPECTED_REPO_FILES


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    messages = [line for line in lines if "error" in line.lower()]  # progress bars may stand before it
    assert messages == lines[-1:], result.stderr
    assert messages[0].startswith("pets-diffusion push: error: ")
    return messages[0]


def test_an_output_dir_without_a_pipeline_is_refused(hub, tmp_path):
    (tmp_path / "empty").mkdir()
    calls_before = len(hub.state.calls)
    message = one_line_error(push(hub, tmp_path, tmp_path / "empty", "tester/nothing"))
    assert "holds no saved pipeline" in message and "model_index.json" in message
    assert len(hub.state.calls) == calls_before
    assert "tester/nothing" not in hub.state.repos


@pytest.mark.parametrize("repo_id", ["not a repo id", "owner/name/extra", "just-a-name"])
def test_an_invalid_repo_id_is_refused(hub, training_output, tmp_path, repo_id):
    calls_before = len(hub.state.calls)
    message = one_line_error(push(hub, tmp_path, training_output, repo_id))
    assert repo_id in message
    assert len(hub.state.calls) == calls_before


@pytest.mark.parametrize(
    ("call", "status", "advice"),
    [("create", 401, "token was refused"), ("lfs", 404, "not found"), ("commit", 500, "Hub failed")],
)
def test_a_refusing_server_gives_one_line_and_no_commit(hub, training_output, tmp_path, call, status, advice):
    repo_id = f"tester/refused-{call}"
    hub.state.refuse = {call: status}
    try:
        message = one_line_error(push(hub, tmp_path, training_output, repo_id))
    finally:
        hub.state.refuse = {}
    assert f"HTTP {status}" in message and advice in message and "nothing was committed" in message
    repo = hub.state.repos.get(repo_id)
    assert repo is None or (repo.commits == [] and repo.branches["main"] == {})


def test_training_pushes_at_each_model_save(hub, tmp_path):
    from .helpers import launch, make_image_folder, tiny_training_args, write_tiny_config

    output = tmp_path / "run"
    args = tiny_training_args(
        make_image_folder(tmp_path / "images", count=8), write_tiny_config(tmp_path / "tiny.json"), output,
        "--max_train_steps", "4", "--save_images_steps", "2", "--checkpointing_steps", "2",
        "--save_model_epochs", "1", "--push_to_hub", "--hub_model_id", "tester/trained", "--hub_private_repo",
    )  # fmt: skip
    launch(args, env=hub_env(hub, tmp_path))
    repo = hub.state.repos["tester/trained"]
    assert repo.private and len(repo.commits) == 2  # 8 images in batches of 4: a model save after each epoch
    assert set(repo.branches["main"]) == EXPECTED_REPO_FILES
    card = repo.branches["main"]["README.md"].decode()
    assert "8 images" in card and f"CPU: {describe_cpu()}, {os.cpu_count()} cores" in card
    assert json.loads(repo.branches["main"]["model_index.json"])["unet"] == ["pets_unet", "PetsUNet2DModel"]


def test_push_with_space_makes_a_gradio_space_whose_app_serves_the_model(hub, training_output, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra (Gradio) is not installed")
    result = push(hub, tmp_path, training_output, "tester/pets-for-space", "--space", "tester/pets-demo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed the Space tester/pets-demo, serving tester/pets-for-space" in result.stdout
    space = hub.state.spaces["tester/pets-demo"]
    assert space.sdk == "gradio" and "tester/pets-demo" not in hub.state.repos
    files = space.branches["main"]
    modules = {f"pets_diffusion_demo/{name}" for name in ("__init__.py", "demo.py", "sampling.py", "objective.py",
                                                          "guidance.py", "hardware.py", "storage.py")}  # fmt: skip
    assert set(files) == {"app.py", "requirements.txt", "README.md", *modules}
    package = Path(sys.modules[PetsUNet2DModel.__module__].__file__).parent
    for name in modules - {"pets_diffusion_demo/__init__.py"}:  # the installed package's own modules
        assert files[name] == (package / name.split("/")[1]).read_bytes()
    metadata = yaml.safe_load(files["README.md"].decode().split("---")[1])
    import gradio

    assert metadata["sdk"] == "gradio" and metadata["sdk_version"] == gradio.__version__
    assert metadata["app_file"] == "app.py" and metadata["models"] == ["tester/pets-for-space"]
    import diffusers

    requirements = files["requirements.txt"].decode().split()
    assert requirements == ["torch>=2.4", f"diffusers=={diffusers.__version__}", f"gradio=={gradio.__version__}"]
    assert 'MODEL = "tester/pets-for-space"' in files["app.py"].decode()
    assert "trust_remote_code=True" in files["app.py"].decode()

    # tests/test_package.py installs this Space's requirements.txt into a fresh venv as a Space would and runs it.


def test_a_space_id_that_is_not_a_repo_id_is_refused(hub, training_output, tmp_path):
    pytest.importorskip("gradio", reason="the demo extra (Gradio) is not installed")
    result = push(hub, tmp_path, training_output, "tester/pets-ok", "--space", "not a space")
    assert result.returncode != 0 and "'not a space' is not a valid repo id" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "not a space" not in hub.state.spaces
    assert "tester/pets-ok" not in hub.state.repos  # refused before the model was pushed


def card_for_data(training_output, tmp_path, data_args: dict) -> tuple[dict, str]:
    """The exported card's front matter and text, for the run's training_args.json naming other data."""
    run = tmp_path / "run"
    shutil.copytree(training_output, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    args = json.loads((run / "training_args.json").read_text())
    (run / "training_args.json").write_text(json.dumps({**args, **data_args}))
    card = (export_for_hub(run, tmp_path / "export", "tester/other") / "README.md").read_text()
    return yaml.safe_load(card.split("---\n")[1]), card


def test_a_card_of_a_run_on_an_image_folder_names_the_folder_and_asks_for_a_licence(training_output, tmp_path):
    (tmp_path / "noise-images").mkdir()
    front_matter, card = card_for_data(training_output, tmp_path, {"train_data_dir": str(tmp_path / "noise-images")})
    assert "license" not in front_matter and "datasets" not in front_matter and "pets" not in front_matter["tags"]
    assert "The image folder `noise-images`: 7349 images." in card
    assert "The training data's licence is not recorded." in card and "`license:`" in card
    assert "Oxford" not in card and "Parkhi" not in card and "CC BY-SA" not in card
    assert "pip install pets-diffusion" not in card and "pypi.org" not in card  # not a released package


def test_a_card_of_a_local_dataset_takes_its_name_and_licence_from_the_dataset_card(training_output, tmp_path):
    oxford = tmp_path / "oxford-pets-64"
    oxford.mkdir()
    (oxford / "README.md").write_text("---\nlicense: cc-by-sa-4.0\npretty_name: Oxford-IIIT Pet, 64x64\n---\n# Pets\n")
    front_matter, card = card_for_data(training_output, tmp_path, {"dataset_name": str(oxford)})
    assert front_matter["license"] == "cc-by-sa-4.0" and "pets" in front_matter["tags"]
    assert "Oxford-IIIT Pet, 64x64, from the local dataset `oxford-pets-64`" in card
    assert "CC BY-SA 4.0" in card and "Parkhi" in card
    other = tmp_path / "flowers"
    other.mkdir()
    (other / "README.md").write_text("---\nlicense: cc-by-4.0\npretty_name: Flowers\n---\n")
    front_matter, card = card_for_data(training_output, tmp_path / "second", {"dataset_name": str(other)})
    assert front_matter["license"] == "cc-by-4.0" and "Parkhi" not in card and "Oxford" not in card
    assert "licence, as its dataset card gives it: **cc-by-4.0**" in card


# -- what the card claims about data it does not know ---------------------------------------------------


def test_a_folder_without_training_args_claims_no_dataset_licence_or_citation(training_output, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(training_output, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    (run / "training_args.json").unlink()
    card = (export_for_hub(run, tmp_path / "export", "tester/unknown") / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert "license" not in front_matter and "datasets" not in front_matter and "pets" not in front_matter["tags"]
    assert "does not record" in card and "Oxford" not in card and "Parkhi" not in card and "CC BY-SA" not in card


def test_a_relative_or_moved_local_dataset_is_named_as_local_never_as_a_hub_id(training_output, tmp_path):
    pets = tmp_path / "data" / "my-pets"
    pets.mkdir(parents=True)
    (pets / "README.md").write_text("---\nlicense: cc-by-sa-4.0\npretty_name: Oxford-IIIT Pet, 64x64\n---\n")
    # Trained from another folder as `data/my-pets`; the run recorded where that was.
    front_matter, card = card_for_data(training_output, tmp_path, {"dataset_name": "data/my-pets",
                                                                   "dataset_path": str(pets)})  # fmt: skip
    assert front_matter["license"] == "cc-by-sa-4.0" and "datasets" not in front_matter
    assert "from the local dataset `my-pets`" in card and "huggingface.co/datasets" not in card
    shutil.rmtree(pets)  # moved away since: the card says so and claims no licence
    front_matter, card = card_for_data(training_output, tmp_path / "moved", {"dataset_name": "data/my-pets",
                                                                             "dataset_path": str(pets)})  # fmt: skip
    assert "license" not in front_matter and "datasets" not in front_matter
    assert f"no longer at {pets}" in card and "huggingface.co/datasets" not in card and "Parkhi" not in card


def test_a_local_dataset_whose_card_is_malformed_yaml_still_exports_and_names_no_licence(training_output, tmp_path):
    broken = tmp_path / "broken-card"
    broken.mkdir()
    (broken / "README.md").write_text("---\nlicense: [cc-by-sa-4.0\npretty_name: {unclosed\n---\n# Pets\n")
    front_matter, card = card_for_data(training_output, tmp_path, {"dataset_name": str(broken)})
    assert "license" not in front_matter and "the local dataset `broken-card`" in card


def test_a_training_run_on_data_with_a_malformed_card_pushes_and_is_never_ended_by_a_push(hub, tmp_path):
    from datasets import Dataset, Image

    from .helpers import launch, make_image_folder, tiny_training_args, write_tiny_config

    images = make_image_folder(tmp_path / "images", count=8)
    folder = tmp_path / "parquet-data"
    folder.mkdir()
    rows = {"image": [str(path) for path in sorted(images.iterdir())]}
    Dataset.from_dict(rows).cast_column("image", Image()).to_parquet(folder / "train.parquet")
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n")  # beside the Parquet file the run reads
    output = tmp_path / "run"
    args = tiny_training_args(images, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "4",
                              "--save_images_steps", "100", "--save_model_epochs", "1", "--push_to_hub",
                              "--hub_model_id", "tester/broken-card")  # fmt: skip
    at = args.index("--train_data_dir")
    args[at : at + 2] = ["--dataset_name", str(folder / "train.parquet")]
    launch(args, env=hub_env(hub, tmp_path))
    assert json.loads((output / "train_summary.json").read_text())["global_step"] == 4
    card = hub.state.repos["tester/broken-card"].branches["main"]["README.md"].decode()
    assert "the Parquet file `train.parquet`" in card and "cc-by-sa" not in card


def test_a_space_for_a_model_of_unknown_or_other_data_claims_neither_its_licence_nor_cats_and_dogs(tmp_path):
    pytest.importorskip("gradio", reason="the demo extra (Gradio) is not installed")
    from pets_diffusion.hub import TrainingData, export_space

    for data in (None, TrainingData("the image folder `flowers`", None, None, False)):
        folder = export_space("tester/flowers", tmp_path / f"space-{data is None}", data)
        front_matter = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
        assert "license" not in front_matter and "Cats and dogs" not in front_matter["short_description"]
    pets = TrainingData("Oxford-IIIT Pet", "cc-by-sa-4.0", "pcuenq/oxford-pets", True)
    front_matter = yaml.safe_load((export_space("tester/pets", tmp_path / "pets", pets) / "README.md").read_text()
                                  .split("---\n")[1])  # fmt: skip
    assert front_matter["license"] == "cc-by-sa-4.0" and front_matter["short_description"].startswith("Cats and dogs")


LOAD_GUIDED_WITH_ONLY_DIFFUSERS = """
import sys
sys.modules["pets_diffusion"] = None  # this process cannot import pets_diffusion
import numpy, torch
from diffusers import DDPMPipeline, DiffusionPipeline
plain = DDPMPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
assert set(plain.components) == {"unet", "scheduler"}
guided = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline="autoguided_pipeline", trust_remote_code=True)
assert type(guided).__name__ == "AutoGuidedDDPMPipeline" and "pets_diffusion" not in type(guided).__module__
assert guided.config.guidance_scale == 2.0 and type(guided.guide).__name__ == "PetsUNet2DModel"
draw = lambda pipeline, **kw: pipeline(batch_size=2, num_inference_steps=4, output_type="np",
                                       generator=torch.Generator().manual_seed(0), **kw).images
unguided, at_1, at_2 = draw(plain), draw(guided, guidance_scale=1.0), draw(guided)
assert numpy.array_equal(unguided, at_1) and not numpy.array_equal(unguided, at_2)
print("guided and unguided")
"""


def test_a_guided_pipeline_round_trips_through_the_hub_and_loads_in_plain_diffusers_both_ways(
    hub, training_output, tmp_path
):
    from pets_diffusion.pipeline_folder import attach_guide

    guided = tmp_path / "guided"
    shutil.copytree(training_output, guided)
    torch.manual_seed(1)
    weaker = PetsUNet2DModel.from_pretrained(training_output, subfolder="unet")
    with torch.no_grad():
        for parameter in weaker.parameters():
            parameter.mul_(0.9)
    attach_guide(guided, weaker, 2.0, None)
    assert push(hub, tmp_path, guided, "tester/guided").returncode == 0
    files = hub.state.repos["tester/guided"].branches["main"]
    assert {"guide/config.json", "guide/diffusion_pytorch_model.safetensors", "guide/pets_unet.py",
            "autoguided_pipeline.py"} <= set(files)  # fmt: skip
    index = json.loads(files["model_index.json"])
    assert index["_class_name"] == "DDPMPipeline" and index["guide"] == ["pets_unet", "PetsUNet2DModel"]
    card = files["README.md"].decode()
    assert 'custom_pipeline="autoguided_pipeline"' in card and "guided by guide/ at W = 2" in card
    assert_card_samples_are_the_shipped_weights(files, tmp_path / "download")
    load = subprocess.run([sys.executable, "-c", LOAD_GUIDED_WITH_ONLY_DIFFUSERS, "tester/guided"],
                          env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert load.returncode == 0, load.stderr[-3000:]
    assert "guided and unguided" in load.stdout


def test_a_pushed_cards_bits_per_dim_are_those_of_the_weights_it_ships(hub, tmp_path):
    from pets_diffusion.evaluation import RunImages
    from pets_diffusion.likelihood import bits_per_dim

    from .helpers import launch, make_image_folder, tiny_training_args, write_tiny_config

    output = tmp_path / "measured"
    data = make_image_folder(tmp_path / "images", count=12)
    launch(tiny_training_args(data, write_tiny_config(tmp_path / "tiny.json"), output, "--max_train_steps", "12",
                              "--validation_images", "4", "--validation_bpd_timesteps", "5", "--post_hoc_ema",
                              "--post_hoc_ema_every", "3", "--save_model_epochs", "1", "--checkpointing_steps", "100",
                              "--save_images_steps", "100"))  # fmt: skip
    assert push(hub, tmp_path, output, "tester/measured").returncode == 0
    files = hub.state.repos["tester/measured"].branches["main"]
    assert_card_samples_are_the_shipped_weights(files, tmp_path / "download")
    kept = json.loads((output / "train_summary.json").read_text())["pipeline"]
    unet = PetsUNet2DModel.from_pretrained(tmp_path / "download", subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "download", subfolder="scheduler")
    heldout = RunImages(output, "heldout", 16).as_floats()
    bound = bits_per_dim(unet, scheduler, heldout, 5, seed=0, batch_size=4)
    assert bound["bpd"] == pytest.approx(kept["bpd"], rel=1e-6)  # the shipped weights' own bound
    assert f"**{kept['bpd']:.3f} ± {kept['bpd_stderr']:.3f} bits/dim**" in files["README.md"].decode()
