"""A run's JSON records (training_args.json, train_summary.json, validation_images.json, evaluation.json)."""

import json
from pathlib import Path


def read_json(path: Path) -> dict:
    """The record at `path`, or {} when the run has none."""
    return json.loads(path.read_text()) if path.is_file() else {}
