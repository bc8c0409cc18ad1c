"""uncond_flax.storage on local disks and on gs:// (fake-gcs-server on 127.0.0.1), and the outputs written through
it: exported pipelines, image grids, orbax checkpoints, staged log folders."""

import io
import json
import os
import stat
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image
from torch_reference import randomized_torch_unet

from uncond_flax import storage
from uncond_flax.export import load_unet, save_pipeline, to_state_dict, unet_from_state_dict
from uncond_flax.images import save_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "layers_per_block": 1,
}


def _objects(emulator, url: str) -> dict[str, int]:
    """Object name -> size under `url`, listed by the server's JSON API (not through the code under test)."""
    bucket, _, prefix = url[len("gs://") :].partition("/")
    query = urllib.parse.urlencode({"prefix": prefix + "/"})
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{bucket}/o?{query}") as response:
        items = json.load(response).get("items", [])
    return {item["name"][len(prefix) + 1 :]: int(item["size"]) for item in items}


def _object_bytes(emulator, url: str) -> bytes:
    bucket, _, name = url[len("gs://") :].partition("/")
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media") as response:
        return response.read()


def _reference_unet():
    """A randomly initialised diffusers UNet2DModel and our model holding the same weights."""
    torch_model = randomized_torch_unet(TINY_UNET, seed=3)
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return state_dict, unet_from_state_dict(TINY_UNET, state_dict)


# --------------------------------------------------------------------------------------------------------------
# Local paths


def test_urls_are_not_made_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.abspath("gs://b/run/") == "gs://b/run"
    assert storage.join("gs://b/run", "checkpoints", "100") == "gs://b/run/checkpoints/100"
    assert storage.basename("gs://b/run/checkpoints/") == "checkpoints"
    assert storage.abspath("run") == str(tmp_path / "run")
    assert storage.is_remote("gs://b") and not storage.is_remote("/gs:/b") and not storage.is_remote("run")
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme ftp://"):
        storage.exists("ftp://host/x")


def test_local_rename_moves_folders_and_replaces_files(tmp_path):
    storage.write_text(tmp_path / "run" / "checkpoints" / "400" / "x", "4")
    storage.rename(tmp_path / "run" / "checkpoints" / "400", tmp_path / "run" / "aside" / "400")
    assert (tmp_path / "run" / "aside" / "400" / "x").read_text() == "4"
    assert os.listdir(tmp_path / "run" / "checkpoints") == []
    storage.write_text(tmp_path / "new", "new")
    storage.rename(tmp_path / "new", tmp_path / "run" / "aside" / "400" / "x")
    assert (tmp_path / "run" / "aside" / "400" / "x").read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "config.json"
    storage.write_text(target, "old")
    with pytest.raises(TypeError):
        storage.write_bytes(target, object())  # fails after the temporary file was created
    assert target.read_text() == "old"
    assert os.listdir(target.parent) == ["config.json"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_every_exported_file_gets_the_umask_mode(tmp_path, umask, file_mode, dir_mode):
    _, model = _reference_unet()
    old = os.umask(umask)
    try:
        save_pipeline(str(tmp_path / "pipe"), model)
        save_grid(np.zeros((4, 8, 8, 3), np.float32), str(tmp_path / "pipe" / "samples" / "epoch_0000.png"))
    finally:
        os.umask(old)
    modes = {}
    for root, dirs, files in os.walk(tmp_path / "pipe"):
        for name in dirs + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, tmp_path)] = stat.S_IMODE(os.stat(path).st_mode)
    assert "pipe/unet/diffusion_pytorch_model.safetensors" in modes and len(modes) == 8, sorted(modes)
    expected = {p: dir_mode if os.path.isdir(tmp_path / p) else file_mode for p in modes}
    assert modes == expected


def test_unwritable_output_dir_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(storage.StorageError) as error:
        storage.check_writable(str(tmp_path / "a_file" / "run"))
    message = str(error.value)
    assert "\n" not in message and f"output_dir {tmp_path / 'a_file' / 'run'} is not writable" in message
    assert storage.check_writable(str(tmp_path / "ok")) == str(tmp_path / "ok")
    assert os.listdir(tmp_path / "ok") == []  # the probe is gone


def test_gcs_without_gcsfs_is_one_line_naming_the_package_and_extra():
    child = (
        "import sys; sys.modules['gcsfs'] = None\n"  # gcsfs unimportable in this child only
        "from uncond_flax import storage\n"
        "try:\n    storage.check_writable('gs://bkt/run')\n"
        "except storage.StorageError as e:\n    print(e); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    assert "gs://bkt/run needs the gcsfs package" in lines[0]
    assert "pip install 'uncond-flax[gcs]' or pip install gcsfs" in lines[0]


# --------------------------------------------------------------------------------------------------------------
# gs:// through the emulator


def test_gcs_files_round_trip(gcs_emulator, gcs_path):
    storage.check_writable(gcs_path)
    storage.write_text(storage.join(gcs_path, "a", "b.txt"), "hello")
    storage.write_bytes(storage.join(gcs_path, "c.bin"), b"\x00\x01")
    assert _objects(gcs_emulator, gcs_path) == {"a/b.txt": 5, "c.bin": 2}
    assert storage.read_text(f"{gcs_path}/a/b.txt") == "hello"
    assert storage.listdir(gcs_path) == ["a", "c.bin"]
    assert storage.walk_files(gcs_path) == [f"{gcs_path}/a/b.txt", f"{gcs_path}/c.bin"]
    assert (
        storage.isdir(f"{gcs_path}/a") and storage.isfile(f"{gcs_path}/c.bin") and not storage.exists(f"{gcs_path}/x")
    )
    storage.write_text(f"{gcs_path}/d.bin", "older")
    storage.rename(f"{gcs_path}/c.bin", f"{gcs_path}/d.bin")  # a file replaces a file
    assert _objects(gcs_emulator, gcs_path) == {"a/b.txt": 5, "d.bin": 2}
    storage.write_text(f"{gcs_path}/a/sub/c.txt", "c")
    storage.rename(f"{gcs_path}/a", f"{gcs_path}/aside/a")  # a folder moves into a folder that had no objects
    assert _objects(gcs_emulator, gcs_path) == {"aside/a/b.txt": 5, "aside/a/sub/c.txt": 1, "d.bin": 2}
    storage.remove(f"{gcs_path}/d.bin")
    storage.rmtree(f"{gcs_path}/aside")
    assert _objects(gcs_emulator, gcs_path) == {}


def test_missing_bucket_is_one_line(gcs_emulator):
    with pytest.raises(storage.StorageError) as error:
        storage.check_writable("gs://no-such-bucket/run")
    assert "\n" not in str(error.value) and "output_dir gs://no-such-bucket/run is not writable" in str(error.value)


def test_orbax_checkpoint_manager_on_gcs(gcs_emulator, gcs_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    directory = f"{gcs_path}/checkpoints"
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(7)}
    with ocp.CheckpointManager(directory) as manager:
        manager.save(5, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    assert any(name.startswith("5/") for name in _objects(gcs_emulator, directory))
    with ocp.CheckpointManager(directory) as manager:
        assert manager.all_steps() == [5]
        restored = manager.restore(5, args=ocp.args.StandardRestore({"w": np.zeros((2, 3)), "step": np.asarray(0)}))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3))
    assert int(restored["step"]) == 7


def test_pipeline_in_gcs_loads_in_diffusers(gcs_emulator, gcs_path, tmp_path):
    from diffusers import DDPMPipeline

    state_dict, model = _reference_unet()
    save_pipeline(f"{gcs_path}/pipe", model)
    assert set(_objects(gcs_emulator, f"{gcs_path}/pipe")) == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    storage.write_text(f"{gcs_path}/pipe/checkpoints/5/state", "not part of the pipeline")
    with storage.local_copy(f"{gcs_path}/pipe", exclude=("checkpoints",)) as local:
        assert sorted(os.listdir(local)) == ["model_index.json", "scheduler", "unet"]
        pipe = DDPMPipeline.from_pretrained(local)
    assert not os.path.exists(local)
    loaded = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    assert loaded.keys() == state_dict.keys()
    for name, value in state_dict.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    # and our own loader reads the bucket directly
    ours = to_state_dict(load_unet(f"{gcs_path}/pipe"))
    for name, value in state_dict.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_save_grid_to_gcs(gcs_emulator, gcs_path):
    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(np.float32)
    url = save_grid(images, f"{gcs_path}/samples/epoch_0003.png", cols=2, pad=2)
    grid = np.asarray(Image.open(io.BytesIO(_object_bytes(gcs_emulator, url))))
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)
    np.testing.assert_array_equal(grid[2:10, 2:10], np.round(images[0] * 255).astype(np.uint8))
    np.testing.assert_array_equal(grid[12:20, 12:20], np.round(images[3] * 255).astype(np.uint8))


def test_synced_dir_copies_changed_files_to_gcs(gcs_emulator, gcs_path):
    storage.write_text(f"{gcs_path}/logs/metrics.jsonl", '{"step": 1}\n')
    staging = storage.SyncedDir(f"{gcs_path}/logs", pull=("metrics.jsonl",), every_s=3600)
    assert staging.is_staged and not storage.is_remote(staging.local)
    with open(os.path.join(staging.local, "metrics.jsonl"), "a") as f:  # appends to what the bucket held
        f.write('{"step": 2}\n')
    with open(os.path.join(staging.local, "events.out"), "wb") as f:
        f.write(b"e" * 10)
    assert staging.sync() == []  # the last copy (the pull) was under every_s ago
    assert sorted(staging.sync(force=True)) == ["events.out", "metrics.jsonl"]
    assert staging.sync(force=True) == []  # nothing changed
    assert _object_bytes(gcs_emulator, f"{gcs_path}/logs/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    with open(os.path.join(staging.local, "events.out"), "ab") as f:
        f.write(b"f")
    staging.close()
    assert _objects(gcs_emulator, f"{gcs_path}/logs") == {"metrics.jsonl": 24, "events.out": 11}
    assert not os.path.exists(staging.local)


def test_synced_dir_on_a_local_path_is_the_path(tmp_path):
    staging = storage.SyncedDir(str(tmp_path / "logs"))
    assert staging.local == str(tmp_path / "logs") and not staging.is_staged
    (tmp_path / "logs" / "x").write_text("1")
    assert staging.sync() == []
    staging.close()
    assert (tmp_path / "logs" / "x").read_text() == "1"


def _parquet_bytes(tmp_path, tags) -> bytes:
    import datasets
    from fixtures.data_factory import gradient

    images = [Image.fromarray(gradient(12, 20, tag)) for tag in tags]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "shard.parquet"))
    return (tmp_path / "shard.parquet").read_bytes()


def _red_values(source) -> list[int]:
    from uncond_flax.data.transforms import load_resized

    return [int(load_resized(source.get_raw(i), 8, "RGB")[0, 0, 0]) for i in range(len(source))]


def test_train_data_dir_in_gcs_is_mirrored_once(gcs_emulator, gcs_path, tmp_path):
    from fixtures.data_factory import data_config

    from uncond_flax.data.sources import open_source

    storage.write_bytes(f"{gcs_path}/data/train-0.parquet", _parquet_bytes(tmp_path, [10, 20, 30]))
    config = data_config(train_data_dir=f"{gcs_path}/data", cache_dir=str(tmp_path / "cache"))
    assert _red_values(open_source(config)) == [10, 20, 30]
    mirrored = storage.walk_files(tmp_path / "cache" / "uncond_flax_remote")
    (copy,) = [f for f in mirrored if f.endswith("train-0.parquet")]
    stamp = os.stat(copy).st_mtime_ns
    assert _red_values(open_source(config)) == [10, 20, 30]
    assert os.stat(copy).st_mtime_ns == stamp  # unchanged object: not fetched again
    storage.write_bytes(f"{gcs_path}/data/train-0.parquet", _parquet_bytes(tmp_path, [40, 50]))
    assert _red_values(open_source(config)) == [40, 50]  # a rewritten object is fetched again


def test_missing_or_remote_cache_paths_are_one_line(gcs_emulator, gcs_path, tmp_path):
    from fixtures.data_factory import data_config

    from uncond_flax.data.sources import open_source

    with pytest.raises(FileNotFoundError, match=rf"train_data_dir '{gcs_path}/nothing' does not exist"):
        open_source(data_config(train_data_dir=f"{gcs_path}/nothing", cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"cache_dir 'gs://bkt/cache' must be a local folder"):
        open_source(data_config(train_data_dir=f"{gcs_path}/data", cache_dir="gs://bkt/cache"))


def test_a_listing_sees_objects_another_process_wrote_since(gcs_emulator, gcs_path):
    """What another host (or tensorstore in this one) writes after we listed a folder is seen on the next look."""
    storage.write_text(f"{gcs_path}/checkpoints/1/x", "a")
    assert storage.listdir(f"{gcs_path}/checkpoints") == ["1"]
    child = f"from uncond_flax import storage; storage.write_text('{gcs_path}/checkpoints/2/x', 'b')"
    subprocess.run([sys.executable, "-c", child], check=True, cwd=REPO, timeout=120)
    assert storage.listdir(f"{gcs_path}/checkpoints") == ["1", "2"]
    assert storage.isdir(f"{gcs_path}/checkpoints/2")


def test_a_listing_is_fresh_even_where_gcsfs_was_opened_before_this_package(gcs_emulator, gcs_path):
    """orbax, a notebook or a dataset library may open gs:// through etils/fsspec before this package sets gcsfs
    not to cache listings; that filesystem, cached for the process, must not hide another host's objects."""
    script = f"""
import subprocess, sys
from etils import epath
epath.Path("{gcs_path}/other").exists()  # gcsfs opened with its defaults: listings cached
from uncond_flax import storage
storage.write_text("{gcs_path}/checkpoints/1/x", "a")
print(storage.listdir("{gcs_path}/checkpoints"), storage.exists("{gcs_path}/checkpoints/2/x"))
child = "from uncond_flax import storage; storage.write_text('{gcs_path}/checkpoints/2/x', 'b')"
subprocess.run([sys.executable, "-c", child], check=True, timeout=120)
print(storage.listdir("{gcs_path}/checkpoints"), storage.isdir("{gcs_path}/checkpoints/2"))
print(len(storage.walk_files("{gcs_path}/checkpoints")))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, cwd=REPO, timeout=180, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[:3] == ["['1'] False", "['1', '2'] True", "2"], out
