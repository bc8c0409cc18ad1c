"""Every flag of diffusers' train_unconditional.py is a config field with the same name and default."""

import ast
import os
import re

import diffusers
import pytest

from configs.default import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# diffusers' examples/unconditional_image_generation/train_unconditional.py at commit
# c56add8081be60b7e8794e011f1790d0e37aeced (the newest change to the file on main as of 2026-08-22; the last
# flag, --preserve_input_precision, came with PR #12596, commit 58f3771545c81fe6e9179149414d16d251d13d37):
# https://github.com/huggingface/diffusers/blob/c56add8081be60b7e8794e011f1790d0e37aeced/examples/unconditional_image_generation/train_unconditional.py
# Each flag with its default (store_true flags: False). The pip package does not ship the examples; where a
# checkout's copy is found beside it, its flags are read and checked too (see installed_example_flags).
UPSTREAM_FLAGS = {
    "dataset_name": None,
    "dataset_config_name": None,
    "model_config_name_or_path": None,
    "train_data_dir": None,
    "output_dir": "ddpm-model-64",
    "overwrite_output_dir": False,
    "cache_dir": None,
    "resolution": 64,
    "center_crop": False,
    "random_flip": False,
    "train_batch_size": 16,
    "eval_batch_size": 16,
    "dataloader_num_workers": 0,
    "num_epochs": 100,
    "save_images_epochs": 10,
    "save_model_epochs": 10,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 500,
    "adam_beta1": 0.95,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-6,
    "adam_epsilon": 1e-08,
    "use_ema": False,
    "ema_inv_gamma": 1.0,
    "ema_power": 3 / 4,
    "ema_max_decay": 0.9999,
    "push_to_hub": False,
    "hub_token": None,
    "hub_model_id": None,
    "hub_private_repo": False,
    "logger": "tensorboard",
    "logging_dir": "logs",
    "local_rank": -1,
    "mixed_precision": "no",
    "prediction_type": "epsilon",
    "ddpm_num_steps": 1000,
    "ddpm_num_inference_steps": 1000,
    "ddpm_beta_schedule": "linear",
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "resume_from_checkpoint": None,
    "enable_xformers_memory_efficient_attention": False,
    "preserve_input_precision": False,
}
# Flags that deliberately have no field: JAX processes come from jax.distributed, not from a launcher's rank.
NO_FIELD = {"local_rank"}


def argparse_flags(source: str) -> dict[str, object]:
    """{flag: default} of every ``parser.add_argument("--flag", ...)`` in a script's source."""
    flags = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            keywords = {k.arg: k.value for k in node.keywords}
            if "default" in keywords:
                default = eval(compile(ast.Expression(keywords["default"]), "<default>", "eval"))
            else:
                default = (
                    False if ast.literal_eval(keywords.get("action", ast.Constant(None))) == "store_true" else None
                )
            flags[node.args[0].value.removeprefix("--")] = default
    return flags


def installed_example_flags() -> dict[str, object] | None:
    """The flags of the train_unconditional.py of a diffusers source checkout it is installed from, if any."""
    package_dir = os.path.dirname(diffusers.__file__)
    example = os.path.join("examples", "unconditional_image_generation", "train_unconditional.py")
    for checkout in (os.path.dirname(os.path.dirname(package_dir)), os.path.dirname(package_dir)):  # src/ layout
        if os.path.isfile(os.path.join(checkout, example)):
            with open(os.path.join(checkout, example)) as f:
                return argparse_flags(f.read())
    return None


@pytest.mark.parametrize("source", ["pinned", "installed"])
def test_every_diffusers_flag_is_a_field_with_its_default(source):
    flags = UPSTREAM_FLAGS if source == "pinned" else installed_example_flags()
    if flags is None:
        pytest.skip("diffusers' pip package does not ship examples/; the pinned list stands in")
    config = get_config()
    missing = sorted(set(flags) - set(config.keys()) - NO_FIELD)
    assert not missing, f"diffusers flags without a config field: {missing}"
    differ = {k: (v, config[k]) for k, v in flags.items() if k not in NO_FIELD and config[k] != v}
    assert not differ, f"(diffusers default, ours): {differ}"


def test_readme_maps_every_flag():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    unmapped = [flag for flag in UPSTREAM_FLAGS if not re.search(rf"`--{flag}`", readme)]
    assert not unmapped, f"flags missing from the README's flags table: {unmapped}"


def test_argparse_flags_reads_a_script():
    script = 'p.add_argument("--a", type=int, default=3 / 4)\np.add_argument("--b", action="store_true")\n'
    assert argparse_flags(script) == {"a": 0.75, "b": False}
