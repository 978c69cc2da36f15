"""Train an unconditional DDPM on Oxford-IIIT Pet: `accelerate launch train_unconditional.py --help`.

The flags are those of diffusers' examples/unconditional_image_generation/train_unconditional.py, with the same
names, meanings and defaults, plus pets-diffusion's own (held-out validation, learned variances, post-hoc EMA, a
time budget and a learning rate planned over it, the divergence guard, --mixed_precision auto, ...): `--help` lists
every one, docs/training.md says what each is for. The work is done by `pets_diffusion.train`.
"""

from pets_diffusion.train import main

if __name__ == "__main__":
    main()
