"""Write examples/pets-sample: 4 photos of each of the 37 breeds from the offline Oxford-IIIT Pet copy's faithful
`train` split, as the 64x64 PNGs they are there, with their original file names, breeds and species.

    python benchmarks/make_pets_sample.py ../shared/data/oxford-pets-64 examples/pets-sample

The photos of each breed are chosen by a shuffle of its file names seeded by the breed's name, not by looking at them.
README.md and LICENSE are written by hand; this script writes the images and metadata.csv only.
"""

import argparse
import csv
import random
from collections import defaultdict
from pathlib import Path

from datasets import Image

from pets_diffusion.data import load_dataset_folder

PER_BREED = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="The oxford-pets-64 copy (its `train` split).")
    parser.add_argument("out", type=Path)
    options = parser.parse_args()
    train = load_dataset_folder(options.source, "train").cast_column("image", Image(decode=False))
    by_breed = defaultdict(list)
    for index, (name, breed) in enumerate(zip(train["file_name"], train["label"])):
        by_breed[breed].append((name, index))
    options.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for breed in sorted(by_breed):
        chosen = sorted(by_breed[breed])
        random.Random(breed).shuffle(chosen)
        for name, index in sorted(chosen[:PER_BREED]):
            row = train[index]
            png = Path(name).with_suffix(".png").name
            (options.out / png).write_bytes(row["image"]["bytes"])
            rows.append({"file_name": png, "original_name": name, "breed": breed, "species": row["species"]})
    with (options.out / "metadata.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} images of {len(by_breed)} breeds in {options.out}")


if __name__ == "__main__":
    main()
