"""Every flag of diffusers' train_unconditional.py, same name and default, plus what JAX training adds.

Variant configs import this and change a few fields. Override any field on the command line:
    python train_flax.py --config=configs/default.py --config.dataset_name=cifar10
"""

import ml_collections


def default_unet() -> ml_collections.ConfigDict:
    """The UNet2DModel that train_unconditional.py builds; every key of diffusers' config.json is overridable."""
    optional_int = lambda: ml_collections.FieldReference(None, field_type=int)  # noqa: E731
    optional_str = lambda: ml_collections.FieldReference(None, field_type=str)  # noqa: E731
    return ml_collections.ConfigDict(
        dict(
            # sample_size is set to `resolution`.
            in_channels=3,
            out_channels=3,
            center_input_sample=False,
            time_embedding_type="positional",
            time_embedding_dim=optional_int(),
            freq_shift=0,
            flip_sin_to_cos=True,
            down_block_types=(
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "DownBlock2D",
                "AttnDownBlock2D",
                "DownBlock2D",
            ),
            mid_block_type="UNetMidBlock2D",
            up_block_types=(
                "UpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
                "UpBlock2D",
            ),
            block_out_channels=(128, 128, 256, 256, 512, 512),
            layers_per_block=2,
            mid_block_scale_factor=1.0,
            downsample_padding=1,
            downsample_type="conv",
            upsample_type="conv",
            dropout=0.0,
            act_fn="silu",
            attention_head_dim=ml_collections.FieldReference(8, field_type=int),  # None: one head
            norm_num_groups=32,
            attn_norm_num_groups=optional_int(),
            norm_eps=1e-5,
            resnet_time_scale_shift="default",
            add_attention=True,
            class_embed_type=optional_str(),
            num_class_embeds=optional_int(),
            num_train_timesteps=optional_int(),
        )
    )


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- data (diffusers flags) ---
    c.dataset_name = ml_collections.FieldReference(None, field_type=str)
    c.dataset_config_name = ml_collections.FieldReference(None, field_type=str)
    c.train_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.cache_dir = ml_collections.FieldReference(None, field_type=str)
    c.resolution = 64
    c.center_crop = False
    c.random_flip = False
    # 16-bit (and float) images keep their precision through resize and crop, and reach the devices as uint16;
    # without it every image becomes 8-bit RGB/L first, as in diffusers.
    c.preserve_input_precision = False
    c.train_batch_size = 16  # per device
    c.eval_batch_size = 16
    c.dataloader_num_workers = 0
    # --- data (ours) ---
    c.image_column = ml_collections.FieldReference(None, field_type=str)  # None: auto-detect image, then img
    c.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.skip_bad_images = False
    c.decode_cache = False  # decode + resize once into uint8 arrays under cache_dir

    # --- model ---
    c.model_config_name_or_path = ml_collections.FieldReference(None, field_type=str)
    c.model = default_unet()
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # diffusers UNet to fine-tune from

    # --- noise schedule ---
    c.prediction_type = "epsilon"
    c.ddpm_num_steps = 1000
    c.ddpm_num_inference_steps = 1000
    c.ddpm_beta_schedule = "linear"

    # --- optimisation ---
    c.num_epochs = 100
    c.max_train_steps = ml_collections.FieldReference(None, field_type=int)
    c.gradient_accumulation_steps = 1
    # How the micro-batches' gradients are summed inside the step: "unrolled" (one traced copy each), "scan" (one
    # copy in a loop: compile time does not grow with their number), "auto": unrolled on CPU, scan on GPU/TPU.
    c.accumulation_loop = "auto"
    # How the gradient norm (logged, and clipped to 1.0 as diffusers does) is reduced: "per_leaf" (torch's
    # clip_grad_norm_: each parameter's norm, then the norm of those), or "concat" (all gradients laid end to end,
    # one reduction: far fewer GPU kernels; with fsdp > 1 it gathers the gradients). The same norm up to float32
    # rounding.
    c.grad_norm_reduction = "per_leaf"
    # As diffusers' --gradient_checkpointing (its other training scripts): the backward pass recomputes each UNet
    # block's activations instead of keeping them: less device memory (a larger batch fits), about one more
    # forward pass of compute.
    c.gradient_checkpointing = False
    c.learning_rate = 1e-4
    c.lr_scheduler = "cosine"
    c.lr_warmup_steps = 500
    c.adam_beta1 = 0.95
    c.adam_beta2 = 0.999
    c.adam_weight_decay = 1e-6
    c.adam_epsilon = 1e-8
    c.use_ema = False
    c.ema_inv_gamma = 1.0
    c.ema_power = 3 / 4
    c.ema_max_decay = 0.9999
    c.mixed_precision = "no"
    c.seed = 0

    # --- outputs ---
    c.output_dir = "ddpm-model-64"
    # A fresh start (no resume_from_checkpoint) in an output_dir that holds checkpoints is an error; True deletes
    # those checkpoints first. (diffusers' script accepts the flag and ignores it.)
    c.overwrite_output_dir = False
    c.enable_xformers_memory_efficient_attention = False  # accepted; jax.nn.dot_product_attention picks the kernel
    c.save_images_epochs = 10
    c.save_model_epochs = 10
    c.sample_scheduler = "ddpm"  # ddpm | ddim, for the preview grids
    c.sample_num_inference_steps = ml_collections.FieldReference(None, field_type=int)  # None: ddpm_num_inference_steps
    c.logger = "tensorboard"
    c.logging_dir = "logs"
    c.log_every = 10  # metrics are fetched from the device every this many steps (each step still gets a line)

    # --- checkpoints ---
    c.checkpointing_steps = 500  # 0: no periodic checkpoints (a SIGTERM still saves one)
    c.checkpoints_total_limit = ml_collections.FieldReference(None, field_type=int)  # >= 1 newest kept; None: all
    c.resume_from_checkpoint = ml_collections.FieldReference(None, field_type=str)

    # --- hub ---
    c.push_to_hub = False
    c.hub_token = ml_collections.FieldReference(None, field_type=str)
    c.hub_model_id = ml_collections.FieldReference(None, field_type=str)
    c.hub_private_repo = False

    c.max_consecutive_skips = 25  # stop after this many steps in a row with a non-finite loss or gradients

    # JAX's persistent compilation cache: "auto" = $XDG_CACHE_HOME (or ~/.cache)/uncond_flax/jax, never output_dir;
    # a path; None or "" = off. A second start of the same run loads its compiled step from here.
    c.compilation_cache_dir = ml_collections.FieldReference("auto", field_type=str)
    # On a CPU (one process): the train step runs on the calling thread and glibc keeps the memory it frees, so
    # XLA's scratch buffer is reused, not faulted in anew at every step (uncond_flax.cpu_runtime): the small
    # benchmark UNet's step in 0.82x the time. Process-wide; resident memory stays at its peak.
    c.cpu_reuse_memory = True

    # --- parallelism ---
    c.fsdp = 1  # devices that share one sharded copy of params/optimizer state; 1 = replicated
    # "auto": jax.distributed.initialize() when this process is one of several (TPU pod slice, SLURM with several
    # tasks, Open MPI, JAX_COORDINATOR_ADDRESS, or coordinator_address below); True: always (an error when none is
    # found); False: one process. `object`, so True/False/auto all parse on the command line.
    c.distributed = ml_collections.FieldReference("auto", field_type=object)
    c.distributed_timeout_s = 300  # how long processes wait for each other at start before a one-line error
    c.coordinator_address = ml_collections.FieldReference(None, field_type=str)  # e.g. "10.0.0.1:1234"
    c.num_processes = ml_collections.FieldReference(None, field_type=int)
    c.process_id = ml_collections.FieldReference(None, field_type=int)

    return c
