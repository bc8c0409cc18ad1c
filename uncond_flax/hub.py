"""Push the exported pipeline folder to the Hugging Face Hub, as diffusers' trainer does after each save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MODEL_CARD = """---
library_name: diffusers
tags:
- diffusers
- unconditional-image-generation
- ddpm
- jax
- uncond-flax
---

# {name}

A DDPM `UNet2DModel` trained with uncond-flax (JAX/Flax), saved as a diffusers
`DDPMPipeline`.

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{repo_id}")
image = pipeline().images[0]
```

Training data: `{dataset}`, resolution {resolution}, {steps} optimizer steps, global batch {global_batch},
EMA: {use_ema}, mixed precision: {mixed_precision}.
"""


def repo_id_for(config: Any) -> str:
    return config.hub_model_id or Path(config.output_dir).name


def write_model_card(output_dir: str, config: Any, *, steps: int, global_batch: int) -> None:
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(
            MODEL_CARD.format(
                name=Path(config.output_dir).name,
                repo_id=repo_id_for(config),
                dataset=config.dataset_name or config.train_data_dir,
                resolution=config.resolution,
                steps=steps,
                global_batch=global_batch,
                use_ema=config.use_ema,
                mixed_precision=config.mixed_precision,
            )
        )


def push_to_hub(output_dir: str, config: Any, commit_message: str) -> str:
    """Create the repo if needed and upload the pipeline folder (checkpoints and sample grids left out)."""
    from huggingface_hub import HfApi

    api = HfApi(token=config.hub_token)
    repo_id = api.create_repo(repo_id_for(config), private=config.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=["step_*", "epoch_*", "checkpoints/*", "samples/*"],
    )
    return repo_id
