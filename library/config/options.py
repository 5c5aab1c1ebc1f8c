"""`TrainConfig`: every option with its kohya name, default, help group and help text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from library.config.flow import FlowMatchingOptions
from library.config.loss import LossNoiseOptions

GROUPS = {
    "model": "Model",
    "dataset": "Dataset (ignored per key when --dataset_config sets it)",
    "network": "Network (LoRA)",
    "training": "Training",
    "optimizer": "Optimizer and learning-rate schedule",
    "precision": "Precision, attention and memory",
    "saving": "Saving and resuming",
    "logging": "Logging",
    "sampling": "Sample images and validation loss during training",
    "loss": "Loss, noise and timesteps",
    "flux": "FLUX.1 flow matching (flux_train_network.py)",
    "config": "Config files",
}


def flag(default: Any, group: str, help: str, **argparse_kwargs: Any) -> Any:
    metadata = {"group": group, "help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


@dataclass
class TrainConfig(LossNoiseOptions, FlowMatchingOptions):
    # --- model
    pretrained_model_name_or_path: str | None = flag(
        None, "model", "base model: a diffusers folder or a single .safetensors/.ckpt checkpoint (required)"
    )
    v2: bool = flag(
        False, "model", "SD 2.x model (detected from the weights; accepted for kohya compatibility)"
    )
    v_parameterization: bool = flag(
        False, "model", "train with the v-prediction target (SD 2.x 768-v models)"
    )
    vae: str | None = flag(None, "model", "VAE to use instead of the checkpoint's (folder or file)")
    tokenizer_path: str | None = flag(
        None,
        "model",
        "folder with the CLIP tokenizer, for single-file checkpoints (vocab.json, merges.txt); SDXL: the first "
        "(CLIP-L) tokenizer",
    )
    tokenizer_2_path: str | None = flag(
        None,
        "model",
        "second tokenizer for single files: SDXL's OpenCLIP bigG (vocab.json, merges.txt) or FLUX's T5 "
        "(tokenizer.json / spiece.model)",
    )
    clip_l: str | None = flag(None, "flux", "FLUX: CLIP-L text encoder file (clip_l.safetensors)")
    t5xxl: str | None = flag(None, "flux", "FLUX: T5-XXL encoder file (t5xxl_fp16.safetensors)")
    ae: str | None = flag(None, "flux", "FLUX: autoencoder file (ae.safetensors)")
    t5xxl_max_token_length: int | None = flag(
        None, "flux", "FLUX: T5 tokens per caption (default 512 for dev, 256 for schnell)"
    )
    apply_t5_attn_mask: bool = flag(
        False, "flux", "FLUX: mask T5 padding in the text encoder and in the transformer's attention"
    )
    tokenizer_cache_dir: str | None = flag(
        None, "model", "kohya-style local tokenizer cache (<dir>/openai_clip-vit-large-patch14, ...)"
    )
    # --- dataset
    dataset_config: str | None = flag(
        None, "dataset", "dataset TOML/JSON ([general], [[datasets]], [[datasets.subsets]])"
    )
    train_data_dir: str | None = flag(
        None, "dataset", "DreamBooth-style folder of <repeats>_<class tokens> sub-folders"
    )
    reg_data_dir: str | None = flag(None, "dataset", "regularization images, same folder convention")
    in_json: str | None = flag(
        None,
        "dataset",
        "fine-tune metadata (.json or .jsonl, kohya's format): caption, tags and optional image_size per "
        "image; relative image keys are looked up in --train_data_dir (default: the metadata file's folder)",
    )
    validation_split: float = flag(
        0.0,
        "dataset",
        "share of each subset held out for validation, 0 <= x < 1 (kohya's split; never regularization "
        "images); held-out images are never trained on",
    )
    validation_seed: int | None = flag(
        None, "dataset", "seed that picks the validation images (default: --seed)"
    )
    resolution: str | None = flag(None, "dataset", 'training resolution "512" or "512,768" (width,height)')
    train_batch_size: int = flag(1, "dataset", "batch size per device")
    enable_bucket: bool = flag(False, "dataset", "aspect-ratio bucketing")
    min_bucket_reso: int = flag(256, "dataset", "smallest bucket side")
    max_bucket_reso: int = flag(1024, "dataset", "largest bucket side")
    bucket_reso_steps: int = flag(64, "dataset", "bucket side granularity (a multiple of 64 for SD 1.x/2.x)")
    bucket_no_upscale: bool = flag(False, "dataset", "never upscale images to fill a bucket")
    caption_extension: str = flag(".caption", "dataset", "caption file extension")
    caption_extention: str | None = flag(None, "dataset", "legacy misspelling of --caption_extension")
    shuffle_caption: bool = flag(False, "dataset", "shuffle comma-separated tags")
    caption_separator: str = flag(",", "dataset", "tag separator for shuffling")
    keep_tokens: int = flag(0, "dataset", "keep the first N tags in place when shuffling")
    keep_tokens_separator: str = flag(
        "",
        "dataset",
        'caption marker (e.g. "|||"): tags before it stay first and are never dropped; after a second one, last',
    )
    secondary_separator: str | None = flag(
        None,
        "dataset",
        'tags joined by this (e.g. ";;;") shuffle and drop as one; it becomes --caption_separator',
    )
    enable_wildcard: bool = flag(
        False, "dataset", "expand {a|b|c} in captions per step; multi-line captions: one line per step"
    )
    caption_prefix: str | None = flag(None, "dataset", "text put before every caption (with a space)")
    caption_suffix: str | None = flag(None, "dataset", "text put after every caption (with a space)")
    caption_dropout_rate: float = flag(0.0, "dataset", "probability of training a sample on an empty caption")
    caption_dropout_every_n_epochs: int = flag(
        0, "dataset", "train on empty captions every N-th epoch (0: never)"
    )
    caption_tag_dropout_rate: float = flag(
        0.0, "dataset", "probability of dropping each tag not fixed by keep_tokens / keep_tokens_separator"
    )
    token_warmup_min: int = flag(1, "dataset", "tags used at the start of token warmup")
    token_warmup_step: float = flag(
        0.0,
        "dataset",
        "steps over which captions grow from token_warmup_min tags to all (below 1: fraction of the steps)",
    )
    flip_aug: bool = flag(False, "dataset", "random horizontal flips (cached latents include flipped ones)")
    random_crop: bool = flag(False, "dataset", "random instead of center crop (not with --cache_latents)")
    color_aug: bool = flag(
        False,
        "dataset",
        "weak colour augmentation: 1 in 3 samples get a small hue or gamma change (not with --cache_latents)",
    )
    face_crop_aug_range: str | None = flag(
        None,
        "dataset",
        'face-centred crops for images named <name>_<cx>_<cy>_<w>_<h>: "lo,hi" = crop side / face size, '
        "e.g. 2.0,4.0 (not with --cache_latents)",
    )
    resize_interpolation: str | None = flag(
        None,
        "dataset",
        "resampling filter (default: area when shrinking, lanczos when enlarging)",
        choices=[None, "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"],
    )
    alpha_mask: bool = flag(
        False,
        "dataset",
        "use each image's alpha channel as a loss mask (images without alpha are trained fully)",
    )
    strict_dataset: bool = flag(
        False,
        "dataset",
        "fail on unreadable, truncated or empty images instead of skipping them (they are listed in the plan)",
    )
    dataset_repeats: int = flag(1, "dataset", "repeats for datasets that do not set num_repeats")
    prior_loss_weight: float = flag(1.0, "dataset", "loss weight of regularization images")
    cache_latents: bool = flag(False, "dataset", "encode images once and keep latents in RAM")
    cache_latents_to_disk: bool = flag(
        False, "dataset", "cache latents as .npz next to the images (implies --cache_latents)"
    )
    vae_batch_size: int = flag(1, "dataset", "images per VAE batch when caching latents")
    skip_cache_check: bool = flag(
        False, "dataset", "trust existing latent cache files without checking their contents"
    )
    cache_text_encoder_outputs: bool = flag(
        False,
        "dataset",
        "encode every caption once before training and keep the text-encoder outputs in RAM; the text "
        "encoders then leave the GPU. Needs --network_train_unet_only and fixed captions (no shuffle_caption, "
        "caption/tag dropout, token warmup or enable_wildcard)",
    )
    cache_text_encoder_outputs_to_disk: bool = flag(
        False,
        "dataset",
        "also write them as <image>_te_outputs.npz next to the images and reuse valid files "
        "(implies --cache_text_encoder_outputs)",
    )
    max_data_loader_n_workers: int = flag(8, "dataset", "DataLoader worker processes (capped at CPU count)")
    persistent_data_loader_workers: bool = flag(False, "dataset", "keep DataLoader workers between epochs")
    debug_dataset: bool = flag(
        False,
        "dataset",
        "print each sample's image and final caption and save the actual training crops as PNG files, "
        "then exit without training (no weights are loaded)",
    )
    debug_dataset_dir: str | None = flag(
        None, "dataset", "folder for the --debug_dataset previews (default: <output_dir>/debug_dataset)"
    )
    debug_dataset_epochs: int = flag(1, "dataset", "epochs --debug_dataset goes through")
    # --- network
    network_module: str = flag(
        "networks.lora", "network", "network module to train (networks.lora, or a third-party module)"
    )
    network_dim: int | None = flag(None, "network", "LoRA rank (module default when unset: 4)")
    network_alpha: float = flag(
        1.0, "network", "LoRA alpha; the update is scaled by alpha/rank (0 means alpha=rank)"
    )
    network_dropout: float | None = flag(None, "network", "dropout on the LoRA rank activation")
    network_args: list[str] = flag(
        [],
        "network",
        "extra network options as key=value (conv_dim, conv_alpha, loraplus_lr_ratio, ...)",
        nargs="*",
    )
    network_train_unet_only: bool = flag(False, "network", "train only the UNet LoRA")
    network_train_text_encoder_only: bool = flag(False, "network", "train only the text-encoder LoRA")
    network_weights: str | None = flag(
        None, "network", "start from these LoRA weights (keys must match exactly)"
    )
    dim_from_weights: bool = flag(
        False,
        "network",
        "take every module's rank and alpha from --network_weights (which it then continues)",
    )
    base_weights: list[str] | None = flag(
        None, "network", "LoRA files merged into the frozen base model before training", nargs="*"
    )
    base_weights_multiplier: list[float] | None = flag(
        None, "network", "one multiplier per --base_weights file (default 1.0 each)", nargs="*"
    )
    unet_lr: float | None = flag(None, "network", "learning rate of the UNet LoRA (default: --learning_rate)")
    text_encoder_lr: list[float] = flag(
        [], "network", "learning rate of the text-encoder LoRA (default: --learning_rate)", nargs="*"
    )
    # --- training
    max_train_steps: int = flag(
        1600, "training", "optimizer steps to train (overridden by --max_train_epochs)"
    )
    max_train_epochs: int | None = flag(None, "training", "epochs to train")
    gradient_accumulation_steps: int = flag(1, "training", "micro-batches per optimizer step")
    gradient_checkpointing: bool = flag(False, "training", "recompute activations in backward to save memory")
    seed: int | None = flag(
        None, "training", "random seed (random when unset; the chosen seed is printed and saved)"
    )
    max_grad_norm: float = flag(1.0, "training", "gradient clipping norm (0 disables)")
    masked_loss: bool = flag(
        False,
        "training",
        "weight the loss by a mask: each subset's conditioning_data_dir (mask images, R channel; white = "
        "train) or --alpha_mask / alpha_mask = true",
    )
    clip_skip: int | None = flag(
        None, "training", "use the output of the N-th last text-encoder layer (2 = penultimate)"
    )
    max_token_length: int | None = flag(
        None, "training", "caption tokens: 75 (default), 150 or 225", choices=[None, 75, 150, 225]
    )
    weighted_captions: bool = flag(
        False,
        "training",
        "caption weights in kohya's syntax: (word) x1.1, [word] /1.1, (word:1.3); \\( for a literal bracket. "
        "Keep commas out of brackets when tags are shuffled or dropped",
    )
    min_timestep: int | None = flag(None, "training", "lowest sampled timestep (default 0)")
    max_timestep: int | None = flag(None, "training", "highest sampled timestep, exclusive (default 1000)")
    dry_run: bool = flag(
        False,
        "training",
        "check options and datasets, print the plan (buckets, validation split, steps, latent caches) and "
        "exit; reads image headers only and loads no weights",
    )
    # --- optimizer
    optimizer_type: str = flag(
        "AdamW",
        "optimizer",
        "kohya name (case-insensitive): AdamW, AdamW8bit, PagedAdamW(8bit|32bit), Lion, Lion8bit, "
        "PagedLion8bit, SGDNesterov(8bit), Adafactor, Prodigy, DAdaptation/DAdaptAdam/DAdaptAdaGrad/"
        "DAdaptAdan/DAdaptAdanIP/DAdaptLion/DAdaptSGD/DAdaptAdamPreprint, AdamWScheduleFree, "
        "RAdamScheduleFree, SGDScheduleFree; or any dotted class path (torch.optim.SGD)",
    )
    optimizer_args: list[str] = flag(
        [], "optimizer", "optimizer options as key=value (weight_decay=0.01 ...)", nargs="*"
    )
    use_8bit_adam: bool = flag(False, "optimizer", "legacy kohya flag: same as --optimizer_type AdamW8bit")
    use_lion_optimizer: bool = flag(False, "optimizer", "legacy kohya flag: same as --optimizer_type Lion")
    learning_rate: float = flag(2e-6, "optimizer", "base learning rate")
    lr_scheduler: str = flag(
        "constant",
        "optimizer",
        "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt, "
        "cosine_with_min_lr, warmup_stable_decay, piecewise_constant (--lr_scheduler_args step_rules=...), "
        "adafactor",
    )
    lr_warmup_steps: str = flag(
        "0", "optimizer", 'warmup steps; a value below 1 or "10%%" is a fraction of the training steps'
    )
    lr_decay_steps: str = flag(
        "0",
        "optimizer",
        'decay steps of warmup_stable_decay; a value below 1 or "10%%" is a fraction of the training steps',
    )
    lr_scheduler_num_cycles: int = flag(1, "optimizer", "cosine_with_restarts: number of cosine cycles")
    lr_scheduler_power: float = flag(1.0, "optimizer", "polynomial: power of the decay (1 = linear)")
    lr_scheduler_timescale: int | None = flag(
        None, "optimizer", "inverse_sqrt: time scale in steps (default: the warmup steps, else 10000)"
    )
    lr_scheduler_min_lr_ratio: float | None = flag(
        None,
        "optimizer",
        "cosine_with_min_lr (required) and warmup_stable_decay: the lowest lr as a fraction of the base lr",
    )
    lr_scheduler_type: str = flag(
        "", "optimizer", "any scheduler class (a bare name means torch.optim.lr_scheduler.NAME)"
    )
    lr_scheduler_args: list[str] = flag(
        [],
        "optimizer",
        "scheduler options as key=value: step_rules for piecewise_constant, or --lr_scheduler_type's arguments",
        nargs="*",
    )
    scale_weight_norms: float | None = flag(
        None,
        "optimizer",
        "max-norm regularisation: after each step scale down every LoRA module whose weight norm exceeds "
        "this (kohya recommends 1.0); logs max_norm/* and shows keys_scaled in the progress bar",
    )
    # --- precision / memory
    mixed_precision: str = flag("no", "precision", "autocast precision", choices=["no", "fp16", "bf16"])
    full_fp16: bool = flag(
        False,
        "precision",
        "LoRA parameters and gradients in fp16 (needs --mixed_precision fp16; saves memory)",
    )
    full_bf16: bool = flag(
        False,
        "precision",
        "LoRA parameters and gradients in bf16 (needs --mixed_precision bf16; saves memory)",
    )
    no_half_vae: bool = flag(False, "precision", "keep the VAE in float32")
    text_encoder_batch_size: int | None = flag(
        None,
        "precision",
        "captions per text-encoder batch while caching text-encoder outputs (default: the largest dataset "
        "batch size)",
    )
    fp8_base: bool = flag(
        False,
        "precision",
        "store the base model's Linear weights (denoiser and text encoders) as float8_e4m3fn, computed in the "
        "mixed-precision dtype (needs --mixed_precision bf16/fp16)",
    )
    fp8_base_unet: bool = flag(
        False, "precision", "like --fp8_base for the denoiser (UNet / transformer) only"
    )
    estimate_memory: bool = flag(
        False,
        "precision",
        "print the expected peak device memory of a training step with these settings (weights, LoRA + "
        "optimizer state, activations at the largest bucket and batch) and exit; loads the model on the CPU, "
        "trains nothing and writes nothing",
    )
    quantize_base: str | None = flag(
        None,
        "precision",
        "int8: store the denoiser's frozen Linear weights as int8 (per-channel scales) and compute them with "
        "int8 activations (torch._int_mm; faster on GPUs with int8 tensor cores); text encoders stay as "
        "loaded (they run once per caption or are cached); not with --fp8_base/--fp8_base_unet",
        choices=[None, "int8"],
    )
    blocks_to_swap: int | None = flag(
        None,
        "precision",
        "keep this many blocks of the denoiser in CPU memory and bring each to the GPU just before use; "
        "FLUX: N//2 double + 2*(N - N//2) single blocks, as kohya; SD/SDXL: the last N of the UNet's resnets, "
        "attentions and down/upsamplers in execution order (SD 1.x has 44, SDXL 32; the up blocks, which come "
        "last, hold most of the weights); a no-op with a message on CPU",
    )
    cpu_offload_checkpointing: bool = flag(
        False,
        "precision",
        "with --gradient_checkpointing, hold each checkpointed block's saved inputs in CPU memory until "
        "backward (every family; kohya's is FLUX only)",
    )
    torch_compile: bool = flag(
        False,
        "precision",
        "compile each block of the denoiser with torch.compile (falls back to plain execution, with a "
        "message, where the backend does not work)",
    )
    dynamo_backend: str = flag(
        "inductor",
        "precision",
        "torch.compile backend for --torch_compile (inductor, aot_eager, cudagraphs, ...)",
    )
    profile_steps: str | None = flag(
        None,
        "logging",
        "A-B: record a torch.profiler trace (CPU, and CUDA when used) of optimizer steps A to B (1-based) into "
        "<logging_dir or output_dir>/profile/ as a Chrome trace (open in https://ui.perfetto.dev)",
    )
    fused_backward_pass: bool = flag(
        False,
        "precision",
        "step the optimizer on each LoRA tensor inside backward and free its gradient at once, so all "
        "gradients never coexist (AdamW/Adafactor/Lion/SGD; no gradient accumulation, not with fp16; "
        "--max_grad_norm clips each tensor alone)",
    )
    fused_optimizer_groups: int | None = flag(
        None,
        "precision",
        "like --fused_backward_pass, stepping the LoRA tensors in N groups, each as soon as all its gradients "
        "are in; --max_grad_norm clips each group",
    )
    xformers: bool = flag(False, "precision", "xformers attention (optional package)")
    sdpa: bool = flag(False, "precision", "PyTorch scaled-dot-product attention (the default anyway)")
    lowram: bool = flag(False, "precision", "accepted for kohya compatibility; loading is already low-RAM")
    highvram: bool = flag(False, "precision", "skip freeing cached memory between caching batches")
    # --- saving / resume
    output_dir: str | None = flag(None, "saving", "where LoRA files and states are written (required)")
    output_name: str | None = flag(None, "saving", "base file name (default: last)")
    save_model_as: str = flag("safetensors", "saving", "file format", choices=["safetensors", "ckpt", "pt"])
    save_precision: str | None = flag(
        None, "saving", "dtype of saved weights", choices=[None, "float", "fp16", "bf16"]
    )
    save_every_n_epochs: int | None = flag(None, "saving", "also save every N epochs")
    save_every_n_steps: int | None = flag(None, "saving", "also save every N optimizer steps")
    save_state: bool = flag(False, "saving", "save a resumable training state alongside each saved LoRA")
    save_state_on_train_end: bool = flag(False, "saving", "save a resumable state at the end only")
    resume: str | None = flag(
        None, "saving", "resume from a saved state folder (continues step, epoch and data position)"
    )
    overwrite: bool = flag(False, "saving", "allow replacing LoRA files that already exist in --output_dir")
    skip_nan_steps: int = flag(
        0,
        "training",
        "tolerate up to N optimizer steps whose loss is NaN/inf (each skipped: no update, a warning); the "
        "next one stops the run after saving the last good state",
    )
    no_metadata: bool = flag(False, "saving", "write only the minimal ss_* metadata")
    metadata_include_paths: bool = flag(
        False,
        "saving",
        "write the names of your dataset folders (ss_dataset_dirs, ss_tag_frequency, ss_datasets) and of the "
        "base model and VAE (ss_sd_model_name, ss_vae_name: the last path part only) into the LoRA, as kohya "
        "does; without it those folders are named subset_0, subset_1, ... and the model/VAE names are left "
        "out. Absolute paths are never written",
    )
    training_comment: str | None = flag(None, "saving", "comment stored in the metadata")
    metadata_title: str | None = flag(None, "saving", "modelspec title")
    metadata_author: str | None = flag(None, "saving", "modelspec author")
    metadata_description: str | None = flag(None, "saving", "modelspec description")
    metadata_license: str | None = flag(None, "saving", "modelspec license")
    metadata_tags: str | None = flag(None, "saving", "modelspec tags (comma separated)")
    save_last_n_epochs: int | None = flag(
        None, "saving", "keep only the LoRA files of the last N epoch saves (older ones are deleted)"
    )
    save_last_n_steps: int | None = flag(
        None, "saving", "keep only the step saves of the last N steps (older ones are deleted)"
    )
    save_last_n_epochs_state: int | None = flag(
        None, "saving", "keep only the states of the last N epoch saves (default: --save_last_n_epochs)"
    )
    save_last_n_steps_state: int | None = flag(
        None, "saving", "keep only the step states of the last N steps (default: --save_last_n_steps)"
    )
    # --- logging
    logging_dir: str | None = flag(None, "logging", "write TensorBoard logs under this folder")
    log_prefix: str | None = flag(None, "logging", "prefix of the TensorBoard run folder name")
    log_with: str | None = flag(
        None,
        "logging",
        "tensorboard (the default with --logging_dir), wandb (pip install wandb) or all",
        choices=[None, "tensorboard", "wandb", "all"],
    )
    log_tracker_name: str | None = flag(None, "logging", "wandb project name (default: network_train)")
    log_tracker_config: str | None = flag(
        None, "logging", 'TOML file of tracker init options, e.g. [wandb] entity = "me" (kohya\'s format)'
    )
    wandb_run_name: str | None = flag(None, "logging", "wandb run name")
    wandb_api_key: str | None = flag(None, "logging", "wandb API key (logs in before the run; never logged)")
    log_config: bool = flag(False, "logging", "log the options (without secrets and paths) to the trackers")
    # --- sampling and validation
    sample_prompts: str | None = flag(
        None,
        "sampling",
        "kohya prompt file for sample images (.txt lines 'prompt --n neg --w 512 --h 512 --s 30 --l 7.5 "
        "--d seed --ss sampler', or .toml/.json); images go to <output_dir>/sample/",
    )
    sample_every_n_steps: int | None = flag(None, "sampling", "sample images every N optimizer steps")
    sample_every_n_epochs: int | None = flag(
        None, "sampling", "sample images every N epochs (wins over --sample_every_n_steps, as kohya)"
    )
    sample_at_first: bool = flag(False, "sampling", "also sample images before the first step")
    sample_sampler: str = flag(
        "ddim",
        "sampling",
        "sampler: ddim, ddpm, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver, dpmsolver++, "
        "dpmsingle (k_* aliases accepted); --ss in a prompt line overrides it",
    )
    validate_every_n_steps: int | None = flag(
        None, "sampling", "compute the validation loss every N steps (needs a validation split)"
    )
    validate_every_n_epochs: int | None = flag(
        None, "sampling", "compute the validation loss every N epochs (default: every epoch when split)"
    )
    max_validation_steps: int | None = flag(
        None, "sampling", "validation batches per evaluation (default: all held-out images)"
    )
    # --- config files
    config_file: str | None = flag(None, "config", "TOML or YAML file with any of these options (CLI wins)")
    output_config: str | None = flag(None, "config", "write the resolved options to this TOML file and exit")
