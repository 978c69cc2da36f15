"""Train an unconditional DDPM on Oxford-IIIT Pet: `accelerate launch train_unconditional.py --help`.

The flags are those of diffusers' examples/unconditional_image_generation/train_unconditional.py,
plus --max_train_steps, --seed, --max_grad_norm, --gradient_checkpointing, --save_images_steps,
--image_column and --snr_gamma. The work is done by `pets_diffusion.training`.
"""

from pets_diffusion.training import main

if __name__ == "__main__":
    main()
