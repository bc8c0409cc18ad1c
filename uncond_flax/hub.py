"""Push the exported pipeline folder to the Hugging Face Hub, as diffusers' trainer does after each save.

The repo is created (and the token checked) when the run starts, not after the first epoch. A token given as
`hub_token` is used by this process only: it is never written to a file, a log or an exception message.
"""

from __future__ import annotations

import logging
from typing import Any

from uncond_flax import storage
from uncond_flax.errors import one_line

logger = logging.getLogger(__name__)

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
    return config.hub_model_id or storage.basename(config.output_dir)


def write_model_card(output_dir: str, config: Any, repo_id: str, *, steps: int, global_batch: int) -> None:
    storage.write_text(
        storage.join(output_dir, "README.md"),
        MODEL_CARD.format(
            name=storage.basename(config.output_dir),
            repo_id=repo_id,
            dataset=config.dataset_name or config.train_data_dir,
            resolution=config.resolution,
            steps=steps,
            global_batch=global_batch,
            use_ema=config.use_ema,
            mixed_precision=config.mixed_precision,
        ),
    )


class HubRepo:
    """The run's Hub repo: created at start (a bad token or repo id stops the run before compiling)."""

    def __init__(self, config: Any):
        from huggingface_hub import HfApi

        self._token = config.hub_token  # None: huggingface_hub's own login / HF_TOKEN
        self._api = HfApi(token=self._token)
        try:
            self.repo_id = self._api.create_repo(
                repo_id_for(config), private=config.hub_private_repo, exist_ok=True
            ).repo_id
        except Exception as e:  # noqa: BLE001 -- auth, network and validation errors all stop the run here
            raise ValueError(
                f"push_to_hub: cannot create or reach {repo_id_for(config)!r}: {self._redact(e)}"
            ) from None

    def _redact(self, error: BaseException) -> str:
        text = one_line(error)
        return text.replace(self._token, "***") if self._token else text

    def push(self, output_dir: str, commit_message: str) -> bool:
        """Upload the pipeline folder (checkpoints and sample grids left out); False, logged, if it failed.

        A failed upload does not stop training (the export is on disk; the next push sends it), and so cannot
        leave other hosts waiting on this one.
        """
        ignored = ("step_*", "epoch_*", "checkpoints", "samples", ".*")
        try:
            with storage.local_copy(output_dir, exclude=ignored) as folder:  # a gs:// output_dir is fetched first
                self._api.upload_folder(
                    repo_id=self.repo_id,
                    folder_path=folder,
                    commit_message=commit_message,
                    ignore_patterns=["step_*", "epoch_*", "checkpoints/*", "samples/*", ".*"],
                )
            return True
        except Exception as e:  # noqa: BLE001 -- any upload failure is reported the same way
            logger.error("push_to_hub: upload to %s failed: %s", self.repo_id, self._redact(e))
            return False
