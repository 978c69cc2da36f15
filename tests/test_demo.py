"""`pets-diffusion demo`: the generator behind the page, then the page itself in headless Chromium."""

import gc
import io
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler

gr = pytest.importorskip("gradio", reason="the demo extra (Gradio) is not installed")

from pets_diffusion import sampling  # noqa: E402
from pets_diffusion.demo import DemoSampler, Guide, build_demo, launch  # noqa: E402
from pets_diffusion.guidance import AutoGuidedUNet  # noqa: E402

STEPS = 50


def run(generator: DemoSampler, *args) -> tuple:
    """The last update of a generation: (grid, gallery images, grid file, seed used, status)."""
    *_, last = generator.generate(*args)
    return last


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


@pytest.fixture
def generator(tiny_unet):
    return DemoSampler(tiny_unet, DDPMScheduler(num_train_timesteps=STEPS).config)


def test_the_page_makes_the_images_sample_makes_and_streams_the_denoising(generator, tiny_unet):
    updates = list(generator.generate(4, 3, False, "ddim", 10))
    previews, (grid, images, grid_file, seed, status) = updates[:-1], updates[-1]
    assert len(previews) >= 5 and all(update[0] is not None and update[1] is None for update in previews)
    assert previews[0][4] == "Step 1 of 10: the model's current guess of x̂₀"
    scheduler = sampling.make_scheduler("ddim", DDPMScheduler(num_train_timesteps=STEPS).config)
    expected = sampling.sample(tiny_unet, scheduler, 4, 10, seed=3, batch_size=16)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(images), pixels(expected), strict=True))
    assert seed == 3 and status == "Done: 4 image(s), seed 3, ddim, 10 steps."
    assert np.array_equal(np.asarray(grid), np.asarray(sampling.grid(expected)))
    with open(grid_file, "rb") as saved:
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(grid))


def test_a_model_with_a_guide_samples_guided_at_the_sliders_w_and_unguided_at_1(tiny_unet):
    import copy

    import torch

    weaker = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        for parameter in weaker.parameters():
            parameter.mul_(0.8)
    config = DDPMScheduler(num_train_timesteps=STEPS).config
    generator = DemoSampler(tiny_unet, config, Guide(weaker, 2.0, None))
    _, guided, _, _, status = run(generator, 2, 5, False, "dpmsolver", 6, 2.5)
    scheduler = sampling.make_scheduler("dpmsolver", config)
    expected = sampling.sample(AutoGuidedUNet(tiny_unet, weaker, 2.5), scheduler, 2, 6, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(guided), pixels(expected), strict=True))
    assert status.endswith("6 steps, guidance 2.5.")
    _, plain, _, _, status = run(generator, 2, 5, False, "dpmsolver", 6, 1.0)
    unguided = sampling.sample(tiny_unet, sampling.make_scheduler("dpmsolver", config), 2, 6, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(unguided), strict=True))
    with pytest.raises(gr.Error, match="Guidance must be from 0 to 5"):
        run(generator, 2, 5, False, "dpmsolver", 6, 9.0)


def test_a_random_seed_is_shown_and_makes_the_same_images_again(tiny_unet):
    generator = DemoSampler(tiny_unet, DDPMScheduler(num_train_timesteps=STEPS).config)
    _, first, _, seed, _ = run(generator, 2, 0, True, "dpmsolver", 5)
    assert seed != 0  # drawn, not the seed box's value (a 1 in 2**32 chance of a false failure)
    _, again, grid_file, same_seed, _ = run(generator, 2, seed, False, "dpmsolver", 5)
    assert same_seed == seed and all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(again)))
    folder = Path(grid_file).parent  # one folder per page, however many generations, gone with the page
    assert sorted(path.name for path in folder.iterdir()) == [f"pets-2-seed{seed}-dpmsolver5.png"]
    del generator
    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0, False, "ddim", 10), "Number of images must be a whole number from 1 to 16; got 0."),
        ((17, 0, False, "ddim", 10), "Number of images must be a whole number from 1 to 16; got 17."),
        ((2, -1, False, "ddim", 10), "Seed must be a whole number from 0 to 4294967295; got -1."),
        ((2, 1.5, False, "ddim", 10), "Seed must be a whole number from 0 to 4294967295; got 1.5."),
        ((2, 0, False, "ddpm", 51), "Steps must be a whole number from 1 to 50; got 51."),
        ((2, 0, False, "dpmsolver", 50), "Steps must be a whole number from 1 to 49; got 50."),
        ((2, 0, False, "euler", 10), "Unknown scheduler 'euler'; choose ddpm, ddim, dpmsolver."),
    ],
)
def test_out_of_range_inputs_get_one_line_on_the_page(generator, args, message):
    with pytest.raises(gr.Error) as refused:
        run(generator, *args)
    assert refused.value.message == message


# -- in a real browser --------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"


def require_browser() -> None:
    """Skip without Chromium and its driver on a developer's machine; in CI (CI=true) that is a failure."""
    if CHROMIUM is not None and CHROMEDRIVER is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{NO_BROWSER}: CI must run the browser tests (.ci/run installs them as root)")
    pytest.skip(NO_BROWSER)


@pytest.fixture
def page(tiny_unet):
    """The demo of a tiny pipeline, served on a free port of 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_demo(tiny_unet, DDPMScheduler(num_train_timesteps=STEPS).config, "pets-diffusion: tiny", "test")
    launch(demo, "127.0.0.1", port, share=False, max_queue=4, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def browser():
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def generate_in_page(driver, url: str, count: int, seed: int, steps: int | None = None):
    """Open the page, type the settings, press Generate; return the gallery's image elements once `count` show."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
    settings = [("#count input[type=number]", count), ("#seed input", seed)]
    settings += [("#steps input[type=number]", steps)] if steps is not None else []
    for selector, value in settings:
        field = driver.find_element(By.CSS_SELECTOR, selector)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value), Keys.TAB)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    if steps is not None:
        return wait
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == count)
    return driver.find_elements(By.CSS_SELECTOR, "#gallery img")


def downloaded(elements) -> list[np.ndarray]:
    from PIL import Image

    return [
        np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(element.get_attribute("src")).read())).convert("RGB"))
        for element in elements
    ]


def test_in_chromium_four_images_appear_and_the_same_seed_gives_the_same_pixels(page, browser, tiny_unet, tmp_path):
    from selenium.webdriver.common.by import By

    first = downloaded(generate_in_page(browser, page, count=4, seed=11))
    status = browser.find_element(By.CSS_SELECTOR, "#status").text
    assert status == "Done: 4 image(s), seed 11, dpmsolver, 25 steps."
    screenshot = tmp_path / "demo.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    again = downloaded(generate_in_page(browser, page, count=4, seed=11))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    scheduler = sampling.make_scheduler("dpmsolver", DDPMScheduler(num_train_timesteps=STEPS).config)
    expected = pixels(sampling.sample(tiny_unet, scheduler, 4, 25, seed=11, batch_size=16))
    assert all(np.array_equal(a, b) for a, b in zip(first, expected, strict=True))  # as `pets-diffusion sample`
    assert any(not np.array_equal(first[0], image) for image in first[1:])


def test_in_chromium_too_many_steps_get_a_message_not_a_traceback(page, browser):
    from selenium.webdriver.common.by import By

    wait = generate_in_page(browser, page, count=2, seed=0, steps=STEPS)  # DPM-Solver++ takes at most 49
    wait.until(lambda d: "Steps must be a whole number from 1 to 49" in d.find_element(By.TAG_NAME, "body").text)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and not browser.find_elements(By.CSS_SELECTOR, "#gallery img")
