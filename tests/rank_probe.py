"""What each process of a training run holds, for tests/test_processes.py.

    accelerate launch --multi_gpu --num_processes 2 tests/rank_probe.py OUT [train_unconditional.py flags]

Builds the run's TrainLoop as train_unconditional.py does (resuming when asked), then writes
OUT/rank-<process index>.json: the run's seed, the held-out indices, this process's training images in
epochs 0 and 1 (indices among the readable images, as validation_images.json counts them), and what the
UNet receives in one training step on a batch of zeros (x_t = sqrt(1 - ᾱ_t) ε, and t).
"""

import json
import sys
from pathlib import Path

import torch

from pets_diffusion.options import parse_args, validate_args
from pets_diffusion.train_loop import TrainLoop


def main() -> None:
    out, args = Path(sys.argv[1]), parse_args(sys.argv[2:])
    validate_args(args)
    loop = TrainLoop(args)
    loop.resume()
    kept = loop.dataset.images.indices
    epochs = []
    for epoch in (0, 1):
        loop.dataloader.set_epoch(epoch)  # as TrainLoop.batches does
        epochs.append([kept[index % len(kept)] for batch in loop.dataloader.batch_sampler for index in batch])
    received = {}

    def record(module, positional, keywords):
        received["x_t"], received["t"] = positional[0].flatten()[:64].tolist(), positional[1].tolist()

    loop.unwrapped.register_forward_pre_hook(record, with_kwargs=True)
    loop.forward_backward({"input": torch.zeros(args.train_batch_size, 3, args.resolution, args.resolution)})
    record_ = {"seed": loop.seed, "held_out": loop.validation.held_out_indices, "epochs": epochs, **received}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{loop.accelerator.process_index}.json").write_text(json.dumps(record_))
    loop.accelerator.end_training()


if __name__ == "__main__":
    main()
