"""The sample CLI: a Hub id resolved offline from a Hugging Face cache reads the pipeline's scheduler, images depend
only on (seed, index), the FID outputs (PNGs, .npz), and one-line errors."""

import hashlib
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from PIL import Image
from test_checkpointing import CHILD_ENV, run_child
from test_sampling import CONFIG
from torch_reference import nchw, nhwc, randomized_torch_unet

from uncond_flax.export import load_scheduler_config
from uncond_flax.sample import NpzWriter, main

REPO_ID = "tester/tiny-vpred"


@pytest.fixture(scope="module")
def vpred_pipeline(tmp_path_factory):
    """A pipeline folder written by diffusers itself, with a schedule unlike the defaults: a cosine schedule and
    v_prediction over 100 steps. A sampler that ignores scheduler/ gets other images."""
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-vpred"
    scheduler = DDPMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    DDPMPipeline(unet=randomized_torch_unet(CONFIG, seed=4), scheduler=scheduler).save_pretrained(str(folder))
    return folder


def place_in_hub_cache(cache, repo_id, folder):
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo: models--ORG--NAME/refs/main names the
    commit, snapshots/<commit>/<path> are relative symlinks into blobs/<etag> (sha256 for LFS files, the git
    blob sha1 for the others)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def image_x_T(seed, index, shape):
    """The documented noise contract: image i starts from normal(split(fold_in(key(seed), i))[0])."""
    init_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
    return np.asarray(jax.random.normal(init_key, shape))


def image_step_noise(seed, index, step, shape):
    """The documented noise contract: step j (0-based) of image i adds normal(fold_in(split(fold_in(key(seed), i))[1],
    j)) wherever the scheduler adds noise."""
    _, steps_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
    return np.asarray(jax.random.normal(jax.random.fold_in(steps_key, step), shape))


def read_npz(output_dir):
    with np.load(output_dir / "samples.npz") as f:
        assert list(f.keys()) == ["arr_0"]
        return f["arr_0"]


def test_hub_id_offline_samples_with_the_pipelines_scheduler(tmp_path, vpred_pipeline):
    cache = tmp_path / "hub"
    place_in_hub_cache(cache, REPO_ID, vpred_pipeline)
    args = ["--scheduler", "ddim", "--num_inference_steps", "5", "--num_images", "3", "--batch_size", "2"]
    env = {**CHILD_ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    from_hub = run_child(
        [sys.executable, "-m", "uncond_flax.sample", "--pipeline", REPO_ID, *args, "--seed", "11"]
        + ["--output_dir", str(tmp_path / "hub_out")],
        env=env,
    )
    assert from_hub.returncode == 0, from_hub.stderr[-3000:]
    # stderr is a pipe, not a terminal: one progress line per batch instead of tqdm's redraws.
    assert "uncond_flax.sample: 2/3 images" in from_hub.stderr and "uncond_flax.sample: 3/3 images" in from_hub.stderr

    assert main(["--pipeline", str(vpred_pipeline), *args, "--seed", "11", "--output_dir", str(tmp_path / "out")]) == 0
    hub_images, local_images = read_npz(tmp_path / "hub_out"), read_npz(tmp_path / "out")
    assert hub_images.shape == (3, 8, 8, 3) and hub_images.dtype == np.uint8
    np.testing.assert_array_equal(hub_images, local_images)

    # diffusers on the same weights, scheduler config and starting noise: DDIMPipeline's loop (eta 0 adds none).
    unet = DDPMPipeline.from_pretrained(str(vpred_pipeline)).unet
    scheduler = DDIMScheduler.from_pretrained(str(vpred_pipeline), subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(5)
    x = nchw(np.stack([image_x_T(11, i, (8, 8, 3)) for i in range(3)]))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    expected = nhwc((x / 2 + 0.5).clamp(0, 1)) * 255
    assert np.abs(hub_images - expected).max() <= 0.5 + 1e-3 * 255  # rounding, and float32 order differences
    assert hub_images.std() > 10  # real images, not a clipped constant


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_the_pipelines_own_scheduler_samples_with_the_documented_noise(tmp_path, vpred_pipeline, scheduler_class):
    """Without --scheduler, a pipeline saved with a DDIMScheduler samples with DDIM and one saved with a DDPMScheduler
    with DDPM, each as diffusers' scheduler loop does from the documented x_T and (DDPM) per-step noise."""
    unet = DDPMPipeline.from_pretrained(str(vpred_pipeline)).unet
    folder = tmp_path / scheduler_class.__name__
    scheduler = scheduler_class.from_pretrained(str(vpred_pipeline), subfolder="scheduler")
    pipeline_class = DDIMPipeline if scheduler_class is DDIMScheduler else DDPMPipeline
    pipeline_class(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    seed, count, steps = 6, 2, 4
    out = tmp_path / "out"
    argv = ["--pipeline", str(folder), "--num_inference_steps", str(steps), "--num_images", str(count)]
    assert main([*argv, "--seed", str(seed), "--output_dir", str(out)]) == 0
    images = read_npz(out)

    scheduler.set_timesteps(steps)
    x = nchw(np.stack([image_x_T(seed, i, (8, 8, 3)) for i in range(count)]))
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            model_output = unet(x, t).sample
            if scheduler_class is DDIMScheduler:
                x = scheduler.step(model_output, t, x, eta=0.0).prev_sample
                continue
            # diffusers' DDPM step adds std_t * randn(generator): drawn twice from known generators, the difference
            # gives std_t, and the documented noise replaces the draw.
            draws = [torch.randn(x.shape, generator=torch.Generator().manual_seed(g)) for g in (0, 1)]
            outs = [
                scheduler.step(model_output, t, x, generator=torch.Generator().manual_seed(g)).prev_sample
                for g in (0, 1)
            ]
            delta = draws[0] - draws[1]
            std = float(((outs[0] - outs[1]) * delta).sum() / (delta * delta).sum())
            assert (std > 0) == (int(t) > 0)
            ours = nchw(np.stack([image_step_noise(seed, i, j, (8, 8, 3)) for i in range(count)]))
            x = outs[0] + std * (ours - draws[0])
    expected = nhwc((x / 2 + 0.5).clamp(0, 1)) * 255
    assert np.abs(images - expected).max() <= 0.5 + 1e-3 * 255  # rounding, and float32 order differences
    assert images.std() > 10


def test_npz_appears_only_when_complete(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    whole = NpzWriter(str(tmp_path / "whole.npz"), images.shape)
    whole.write(images[:2])
    whole.write(images[2:])
    whole.close()
    with np.load(tmp_path / "whole.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)
    cut = NpzWriter(str(tmp_path / "cut.npz"), images.shape)
    cut.write(images[:2])  # sampling stopped after two of three images
    cut.close()
    assert sorted(os.listdir(tmp_path)) == ["whole.npz"]  # no partial .npz, under its name or another


def test_images_depend_only_on_seed_and_index(tmp_path, vpred_pipeline):
    common = ["--pipeline", str(vpred_pipeline), "--num_inference_steps", "4", "--num_images", "10", "--seed", "5"]
    # Batches of 3 (padded to 8 for the 8 devices: four calls) against one batch of 10 (padded to 16).
    assert (
        main([*common, "--batch_size", "3", "--output_dir", str(tmp_path / "b3"), "--output", str(tmp_path / "g.png")])
        == 0
    )
    (tmp_path / "b10" / "images").mkdir(parents=True)
    (tmp_path / "b10" / "images" / "000099.png").write_bytes(b"an earlier, longer run's image")
    assert main([*common, "--batch_size", "10", "--output_dir", str(tmp_path / "b10"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path / "b10" / "images")) == [f"{i:06d}.png" for i in range(10)]
    by_3, by_10 = read_npz(tmp_path / "b3"), read_npz(tmp_path / "b10")
    assert by_3.shape == (10, 8, 8, 3)
    diff = np.abs(by_3.astype(int) - by_10)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95  # float32 reduction order differs with the batch shape
    assert len({image.tobytes() for image in by_3}) == 10  # every index has its own noise

    names = sorted(os.listdir(tmp_path / "b3" / "images"))
    assert names == [f"{i:06d}.png" for i in range(10)]
    for i, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b3" / "images" / name)), by_3[i])
    assert Image.open(tmp_path / "g.png").size == (4 * 10 + 2, 3 * 10 + 2)  # 4 columns x 3 rows of 8 px, 2 px apart
    assert not os.path.exists(tmp_path / "b10" / "samples.png")  # with --output_dir, a grid only when asked


def _error(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("uncond_flax.sample: error: ") and "\n" not in message, message
    return message


def test_bad_arguments_are_one_line(tmp_path, vpred_pipeline):
    pipe = ["--pipeline", str(vpred_pipeline)]
    assert "no such folder" in _error(["--pipeline", str(tmp_path / "missing")])
    assert "could not be fetched from the Hub" in _error(["--pipeline", "tester/not-in-any-cache"])
    assert "--raw applies to --checkpoint only" in _error([*pipe, "--raw"])
    assert "--seed -1: must be in [0, 2**32)" in _error([*pipe, "--seed", "-1"])
    assert f"--seed {2**32}: must be in [0, 2**32)" in _error([*pipe, "--seed", str(2**32)])
    assert "--eta -0.5: must be >= 0" in _error([*pipe, "--scheduler", "ddim", "--eta", "-0.5"])
    assert "--eta applies to DDIM only" in _error([*pipe, "--eta", "0.5"])
    assert "num_inference_steps=500" in _error([*pipe, "--num_inference_steps", "500"])
    assert "no such directory" in _error(["--checkpoint", str(tmp_path / "run" / "checkpoints")])
    (tmp_path / "full" / "images").mkdir(parents=True)
    (tmp_path / "full" / "images" / "000000.png").write_bytes(b"an earlier run's image")
    assert "already holds samples; pass --overwrite" in _error([*pipe, "--output_dir", str(tmp_path / "full")])
    # --overwrite replaces them only once everything else checked out: a failed start loses nothing.
    assert "--eta applies to DDIM only" in _error(
        [*pipe, "--output_dir", str(tmp_path / "full"), "--overwrite", "--eta", "1"]
    )
    assert (tmp_path / "full" / "images" / "000000.png").read_bytes() == b"an earlier run's image"


def test_scheduler_config_of_nested_flat_and_bare_folders(tmp_path, vpred_pipeline):
    written = json.loads((vpred_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert load_scheduler_config(str(vpred_pipeline)) == written
    flat = tmp_path / "flat"  # an old flat repo: the unet's files and scheduler_config.json side by side
    shutil.copytree(vpred_pipeline / "unet", flat)
    shutil.copy(vpred_pipeline / "scheduler" / "scheduler_config.json", flat)
    shutil.copy(vpred_pipeline / "model_index.json", flat)
    assert load_scheduler_config(str(flat)) == written
    assert DDPMPipeline.from_pretrained(str(flat)).scheduler.config.prediction_type == "v_prediction"
    assert load_scheduler_config(str(vpred_pipeline / "unet")) is None
