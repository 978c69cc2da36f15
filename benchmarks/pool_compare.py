"""Pool compare_runs.py reports over disjoint slices of the same held-out images into one table.

    python benchmarks/pool_compare.py runs/recipe/variance-compare runs/recipe/variance-compare-32-63

Each report gives, per run, the mean and standard error (unbiased std / √n) of per-image values over its
slice; from those the mean and standard error over all images follow exactly, for the bound, its KL part,
the loss and the paired difference against the first run.
"""

import argparse
import json
import math
from pathlib import Path


def pool(parts: list[tuple[int, float, float]]) -> tuple[float, float]:
    """(n, mean, stderr) of disjoint slices -> (mean, stderr) of them all."""
    count = sum(n for n, _, _ in parts)
    mean = sum(n * m for n, m, _ in parts) / count
    squares = sum((n - 1) * n * s * s + n * m * m for n, m, s in parts)  # Σx² of each slice, from its variance
    return mean, math.sqrt((squares - count * mean * mean) / (count - 1) / count)


def pooled(sizes: list[int], slices: list[dict], key: str) -> tuple[float, float]:
    """`key` and `key`_stderr of each slice, pooled."""
    return pool([(n, values[key], values[f"{key}_stderr"]) for n, values in zip(sizes, slices)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", type=Path, nargs="+", help="compare_runs.py --out folders (each has compare.json).")
    reports = [json.loads((folder / "compare.json").read_text()) for folder in parser.parse_args().reports]
    print("| run | images | bits/dim | decoder | KL terms | minus the first (paired) | held-out loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rows in zip(*reports, strict=True):
        sizes = [row["bound"]["num_images"] for row in rows]
        bounds = [row["bound"] for row in rows]
        bpd, kl = pooled(sizes, bounds, "bpd"), pooled(sizes, bounds, "kl_bpd")
        decoder = sum(n * bound["decoder_bpd"] for n, bound in zip(sizes, bounds)) / sum(sizes)
        difference, loss = pooled(sizes, rows, "bpd_minus_first"), pooled(sizes, rows, "loss")
        print(f"| {rows[0]['run']} | {sum(sizes)} | {bpd[0]:.4f} ± {bpd[1]:.4f} | {decoder:.4f} | "
              f"{kl[0]:.4f} ± {kl[1]:.4f} | {difference[0]:+.4f} ± {difference[1]:.4f} | "
              f"{loss[0]:.5f} ± {loss[1]:.5f} |")  # fmt: skip


if __name__ == "__main__":
    main()
