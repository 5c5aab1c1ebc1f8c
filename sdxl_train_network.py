"""Train a LoRA for SDXL and its derivatives (kohya sd-scripts compatible flags).

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path MODEL --dataset_config ds.toml \\
        --output_dir out --output_name my_lora --network_module networks.lora --network_dim 16 ...
"""

import sys

from library.entry import main

if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1:],
            prog="sdxl_train_network.py",
            family="sdxl",
            description="Train a LoRA for SDXL (base 1.0 and derivatives) with kohya-compatible options.",
        )
    )
