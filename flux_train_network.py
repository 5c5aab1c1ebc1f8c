"""Train a LoRA for FLUX.1 dev / schnell (kohya sd-scripts compatible flags).

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \\
        --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors \\
        --dataset_config ds.toml --output_dir out --output_name my_lora --network_module networks.lora_flux ...
"""

import sys

from library.entry import main

if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1:],
            prog="flux_train_network.py",
            family="flux",
            description="Train a LoRA for FLUX.1 dev/schnell with kohya-compatible options.",
        )
    )
