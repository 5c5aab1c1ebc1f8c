"""Train a LoRA for Stable Diffusion 1.x / 2.x (kohya sd-scripts compatible flags).

    accelerate launch train_network.py --pretrained_model_name_or_path MODEL --dataset_config ds.toml \\
        --output_dir out --output_name my_lora --network_module networks.lora --network_dim 16 ...
"""

import sys

from library.entry import main

if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1:],
            prog="train_network.py",
            family="sd",
            description="Train a LoRA for Stable Diffusion 1.x/2.x with kohya-compatible options.",
        )
    )
