"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).

During training two power-function EMAs of the weights are tracked (relative widths σ_rel, e.g. 0.05
and 0.10) and saved as snapshots every few steps. Afterwards, the EMA of any σ_rel at any snapshot's
step is reconstructed as the least-squares combination of the snapshots whose averaging profiles
best match its own (EDM2 Algorithm 3). Time is counted in optimiser steps; the profiles depend only
on ratios of times, so this is EDM2's choice (images seen) up to a constant.

The functions follow NVlabs/edm2's `training/phema.py`. ema-pytorch's `PostHocEMA` does the same
maths, but keeps its own step counter and pickled `.pt` snapshots outside Accelerate's checkpoint,
which our exact resume and weights-only loading cannot take.
"""

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SNAPSHOT_DIR = "post_hoc_ema"
SNAPSHOT_NAME = re.compile(r"sigma-(\d+\.\d+)-step-(\d+)\.safetensors")
MAX_SIGMA_REL = float(np.sqrt(1 / 12))  # exponent 0: the widest power-function profile, the uniform average


def std_to_exp(sigma_rel: float | np.ndarray) -> np.ndarray:
    """The power-function exponent γ of a relative width σ_rel (EDM2 eq. 126, Algorithm 2)."""
    sigma_rel = np.float64(sigma_rel)
    roots = [np.roots([1, 7, 16 - s**-2, 12 - s**-2]).real.max() for s in sigma_rel.flatten()]
    return np.float64(roots).reshape(sigma_rel.shape)


def exp_to_std(exponent: float | np.ndarray) -> np.ndarray:
    """σ_rel of the exponent γ (EDM2 eq. 123)."""
    exponent = np.float64(exponent)
    return np.sqrt((exponent + 1) / (exponent + 2) ** 2 / (exponent + 3))


def power_function_beta(exponent: float, step: int) -> float:
    """The decay that keeps an EMA on the profile p(τ) ∝ τ^γ over τ ≤ t after step t (EDM2 eq. 127, Δt = 1)."""
    return (1 - 1 / step) ** (exponent + 1)


def power_function_correlation(a_step, a_std, b_step, b_std) -> np.ndarray:
    """Inner products of power-function profiles ending at a_step and b_step (EDM2 eq. 151, Algorithm 3)."""
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    ratio = a_step / b_step
    ratio_exp = np.where(a_step < b_step, b_exp, -a_exp)
    numerator = (a_exp + 1) * (b_exp + 1) * ratio**ratio_exp
    return numerator / ((a_exp + b_exp + 1) * np.maximum(a_step, b_step))


def solve_coefficients(in_steps, in_stds, out_step: int, out_std: float) -> np.ndarray:
    """Weights of the snapshots (steps, σ_rel) whose sum best matches the profile (out_step, out_std) (Algorithm 3)."""
    column = lambda values: np.float64(values).reshape(-1, 1)  # noqa: E731
    row = lambda values: np.float64(values).reshape(1, -1)  # noqa: E731
    gram = power_function_correlation(column(in_steps), column(in_stds), row(in_steps), row(in_stds))
    target = power_function_correlation(column(in_steps), column(in_stds), row([out_step]), row([out_std]))
    weights = np.linalg.solve(gram, target)[:, 0]
    return weights / weights.sum()


def check_sigma_rel(sigma_rel: float) -> float:
    """A relative width a power-function EMA can have, (0, 0.2887); else a ValueError saying so."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"σ_rel {sigma_rel:g} is outside (0, {MAX_SIGMA_REL:.4f}); EDM2 used 0.05 to 0.20.")
    return sigma_rel


class PowerFunctionEMA:
    """Power-function EMAs of the parameters, one per σ_rel (fp32), updated after every optimiser step."""

    def __init__(self, named_parameters, sigma_rels: tuple[float, ...] = (0.05, 0.10)):
        self.sigma_rels = tuple(check_sigma_rel(sigma_rel) for sigma_rel in sigma_rels)
        self.exponents = [float(std_to_exp(sigma_rel)) for sigma_rel in self.sigma_rels]
        named = list(named_parameters)
        self.names = [name for name, _ in named]
        self.averages = [[parameter.detach().float().clone() for _, parameter in named] for _ in self.sigma_rels]

    @torch.no_grad()
    def step(self, parameters, step: int) -> None:
        """Fold in the parameters after optimiser step `step` (1, 2, ...)."""
        current = [parameter.detach().float() for parameter in parameters]
        for exponent, average in zip(self.exponents, self.averages):
            torch._foreach_lerp_(average, current, 1 - power_function_beta(exponent, step))

    def to(self, device: torch.device) -> "PowerFunctionEMA":
        self.averages = [[tensor.to(device) for tensor in average] for average in self.averages]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every average as one flat dict of tensors (safetensors-ready), keyed `<index>.<parameter name>`."""
        return {
            f"{index}.{name}": tensor.contiguous()
            for index, average in enumerate(self.averages)
            for name, tensor in zip(self.names, average)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for index, average in enumerate(self.averages):
            for tensor, name in zip(average, self.names):
                tensor.copy_(state[f"{index}.{name}"])

    def save_snapshots(self, output_dir: str | Path, step: int) -> list[Path]:
        """Write each average's parameters at `step` to post_hoc_ema/ (written aside, then renamed into place)."""
        folder = Path(output_dir) / SNAPSHOT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for sigma_rel, average in zip(self.sigma_rels, self.averages):
            path = folder / snapshot_name(sigma_rel, step)
            partial = path.with_name(f".{path.name}.partial")
            tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in zip(self.names, average)}
            save_file(tensors, str(partial))  # no metadata: safetensors writes a dict of it in a random order
            partial.replace(path)
            paths.append(path)
        return paths


def snapshot_name(sigma_rel: float, step: int) -> str:
    return f"sigma-{sigma_rel:.4f}-step-{step:08d}.safetensors"


def list_snapshots(output_dir: str | Path) -> list[tuple[float, int, Path]]:
    """The run's snapshots as (σ_rel, step, path), by step."""
    folder = Path(output_dir) / SNAPSHOT_DIR
    found = []
    for path in folder.glob("sigma-*-step-*.safetensors") if folder.is_dir() else []:
        match = SNAPSHOT_NAME.fullmatch(path.name)
        if match:
            found.append((float(match[1]), int(match[2]), path))
    return sorted(found, key=lambda item: (item[1], item[0]))


def snapshots_after(output_dir: str | Path, step: int) -> list[Path]:
    """The snapshot files of steps after `step`."""
    return [path for _, snapshot_step, path in list_snapshots(output_dir) if snapshot_step > step]


def remove_snapshots_after(output_dir: str | Path, step: int) -> None:
    """Drop snapshots of steps a resumed run will redo (a run killed after its last checkpoint left them)."""
    for path in snapshots_after(output_dir, step):
        path.unlink()


def reconstruct(output_dir: str | Path, sigma_rel: float, step: int | None = None) -> tuple[dict, dict]:
    """The EMA of width `sigma_rel` at `step` (default: the last snapshot's), from the run's snapshots.

    Returns its state dict and how it was made: the snapshots used, their weights and the step.
    """
    check_sigma_rel(sigma_rel)
    snapshots = list_snapshots(output_dir)
    if not snapshots:
        raise FileNotFoundError(
            f"{output_dir} has no post-hoc EMA snapshots ({SNAPSHOT_DIR}/); train with --post_hoc_ema first."
        )
    last = max(snapshot_step for _, snapshot_step, _ in snapshots)
    step = last if step is None else step
    usable = [(std, at, path) for std, at, path in snapshots if at <= step]
    if step > last or len({std for std, _, _ in usable}) < 2:
        raise ValueError(f"no snapshots to reconstruct step {step} from (the run has them up to step {last}).")
    weights = solve_coefficients([at for _, at, _ in usable], [std for std, _, _ in usable], step, sigma_rel)
    state: dict[str, torch.Tensor] = {}
    for weight, (_, _, path) in zip(weights, usable):
        for name, tensor in load_file(str(path)).items():
            contribution = tensor.double() * weight
            state[name] = state[name].add_(contribution) if name in state else contribution
    recipe = {"sigma_rel": sigma_rel, "step": step, "snapshots": len(usable), "weights": weights.tolist()}
    return {name: tensor.float() for name, tensor in state.items()}, recipe


@contextmanager
def weights_restored(model: torch.nn.Module):
    """Whatever weights are loaded into `model` inside the block (an EMA, a reconstruction), it gets its own back.

    The copy is kept in CPU memory, as diffusers' `EMAModel.store` keeps it: on a GPU it costs no device memory."""
    saved = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    try:
        yield model
    finally:
        model.load_state_dict(saved)
