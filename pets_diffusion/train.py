"""Train from the installed package: `accelerate launch -m pets_diffusion.train [flags]` (the flags of
train_unconditional.py, which calls the same `main`)."""

from .training import main

if __name__ == "__main__":
    main(prog="python -m pets_diffusion.train")
