"""The persistent compilation cache across real processes: the second start loads from it and says so."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: turn the cache on from a config value, compile one program, print where the cache is.
SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
logging.getLogger("uncond_flax").setLevel(logging.INFO)
import jax, jax.numpy as jnp
from uncond_flax.compile_cache import enable_compile_cache
value = None if sys.argv[1] == "None" else sys.argv[1]
print("cache dir:", enable_compile_cache(value), flush=True)
x = jnp.arange(64.0).reshape(8, 8)
print("result:", float(jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x)), flush=True)
"""


def _start(tmp_path, value: str, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # cache even this small program
        PYTHONPATH=ROOT,
        **env_extra,
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, value],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def _entries(path) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


HIT = "loaded from the persistent compilation cache"


def test_second_start_compiles_from_the_cache_and_logs_it(tmp_path):
    cache = tmp_path / "xdg" / "uncond_flax" / "jax"
    first = _start(tmp_path, "auto")
    assert f"cache dir: {cache}" in first
    assert HIT not in first
    written = _entries(cache)
    assert written, "the first start wrote nothing into the cache"

    second = _start(tmp_path, "auto")
    assert HIT in second, second
    assert f"in {cache}" in second
    assert _entries(cache) == written  # nothing compiled again
    assert first.split("result:")[1].split()[0] == second.split("result:")[1].split()[0]


@pytest.mark.parametrize("value", ["None", ""])
def test_off_leaves_no_cache(tmp_path, value):
    out = _start(tmp_path, value)
    assert "cache dir: None" in out and HIT not in out
    assert not (tmp_path / "xdg").exists()


def test_auto_keeps_the_directory_jax_was_given(tmp_path):
    chosen = tmp_path / "chosen"
    out = _start(tmp_path, "auto", JAX_COMPILATION_CACHE_DIR=str(chosen))
    assert f"cache dir: {chosen}" in out
    assert _entries(chosen) and not (tmp_path / "xdg").exists()


def test_an_unwritable_cache_dir_warns_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = _start(tmp_path, str(blocker / "cache"))
    assert "cache dir: None" in out and "compilation cache off: cannot create" in out
    assert "result:" in out


def test_train_step_program_grows_linearly_with_the_parameter_leaves():
    """Every leaf's update reads one finiteness flag. Computed as a chain of per-leaf scalars, XLA fuses a copy
    of the whole chain into each leaf's update (leaves^2 instructions): slower to compile, and the executable is
    slower to load from the persistent cache (XLA:CPU's deserialisation grows with the instruction count)."""
    import jax

    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    from tiny_digits import get_config

    from uncond_flax.config import noise_scheduler_for, resolve_config
    from uncond_flax.optim import lr_schedule_for, make_optimizer
    from uncond_flax.parallel import make_mesh
    from uncond_flax.step import jit_train_step, make_train_step
    from uncond_flax.train_state import train_state_layout

    config = resolve_config(get_config())
    mesh, tx = make_mesh(devices=jax.devices()[:1]), make_optimizer(config, 10)  # one device compiles faster
    graphdef, _, abstract, shardings, _ = train_state_layout(config, mesh, tx)
    step_fn = make_train_step(
        graphdef, tx=tx, lr_fn=lr_schedule_for(config, 10), noise_scheduler=noise_scheduler_for(config), config=config
    )
    jitted, images_sharding = jit_train_step(step_fn, shardings, mesh)
    batch = (1, config.train_batch_size, 8, 8, 1)
    text = jitted.lower(abstract, jax.ShapeDtypeStruct(batch, "uint8", sharding=images_sharding)).compile().as_text()
    leaves = len(jax.tree_util.tree_leaves(abstract.params))
    # 74 leaves: about 300 `and`s with one flag, about 17,000 with a copy of the chain in every update.
    assert text.count(" and(") < 10 * leaves, text.count(" and(")
