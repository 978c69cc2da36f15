"""The CPU pets' data files: the faithful `train` split's 64 held-out images, that split less them, and the full
copy's 7,351 clean images less them, as Parquet files.

    python benchmarks/pets_data.py ../shared/data/oxford-pets-64 ../shared/data/oxford-pets-64-full OUT [COUNT]

OUT/heldout.parquet holds COUNT (64) images of the 1,750-image copy's `train` split, chosen by seed 0 as every
CPU pets run since the axes screen chose them; OUT/train1750.parquet the rest of that split; OUT/full.parquet the
full copy's `train` + `stretched_unsquashed` less the held-out photos (by file name: the full copy's `train`
split holds the same 1,750 photos, byte for byte, in another order).
"""

import sys
from pathlib import Path

from datasets import concatenate_datasets

from pets_diffusion.data import hold_out, load_dataset_folder


def main() -> None:
    source, full, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset_folder(source, "train")
    _, _, held = hold_out(range(len(train)), count, seed=0)
    names = set(train.select(held)["file_name"])
    train.select(held).to_parquet(out / "heldout.parquet")
    train.filter(lambda name: name not in names, input_columns="file_name").to_parquet(out / "train1750.parquet")
    clean = concatenate_datasets([load_dataset_folder(full, split) for split in ("train", "stretched_unsquashed")])
    clean.filter(lambda name: name not in names, input_columns="file_name").to_parquet(out / "full.parquet")


if __name__ == "__main__":
    main()
