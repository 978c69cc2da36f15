"""train_unconditional.py with a fault injected from outside the package, for the divergence tests.

    accelerate launch tests/faulty_train.py [train_unconditional.py flags]

PETS_FAULT chooses the fault, PETS_FAULT_STEP the step it starts at, PETS_FAULT_STEPS (optional) how many steps
it lasts at most:
  lr_spike          from that optimiser step on, the learning rate is 1,000 times the schedule's, until a rollback in
                    this invocation
  lr_spike_forever  the same, through every rollback
  inf_weight        the update of that step leaves one weight infinite (the next step's loss is not finite), once
"""

import os

import torch

from pets_diffusion import train_loop
from pets_diffusion.train import main

FAULT, STEP = os.environ["PETS_FAULT"], int(os.environ["PETS_FAULT_STEP"])
LAST = STEP + int(os.environ.get("PETS_FAULT_STEPS", 10**9)) - 1
LR_SPIKE = 1000.0
plain_optimize = train_loop.TrainLoop.optimize
injected, earlier_rollbacks = [], []


def faulty_optimize(loop) -> None:
    step = loop.global_step + 1  # the optimiser step this update makes
    if not earlier_rollbacks:
        earlier_rollbacks.append(len(loop.rollbacks))  # those of earlier invocations, restored from the checkpoint
    rolled_back = len(loop.rollbacks) > earlier_rollbacks[0]
    spiking = FAULT == "lr_spike_forever" or (FAULT == "lr_spike" and not rolled_back)
    if spiking and STEP <= step <= LAST:
        for group in loop.optimizer.param_groups:
            group["lr"] *= LR_SPIKE
    plain_optimize(loop)
    if FAULT == "inf_weight" and step == STEP and not injected:
        with torch.no_grad():
            next(loop.unwrapped.parameters()).view(-1)[0] = float("inf")
        injected.append(step)


train_loop.TrainLoop.optimize = faulty_optimize

if __name__ == "__main__":
    main()
