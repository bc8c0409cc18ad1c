"""The persistent compilation cache across real processes: the second start loads from it and says so."""

import os
import re
import shutil
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
    from uncond_flax.step import jit_train_step, make_train_step, step_seed
    from uncond_flax.train_state import train_state_layout

    config = resolve_config(get_config())
    mesh, tx = make_mesh(devices=jax.devices()[:1]), make_optimizer(config, 10)  # one device compiles faster
    graphdef, _, abstract, shardings, _ = train_state_layout(config, mesh, tx)
    step_fn = make_train_step(
        graphdef, tx=tx, lr_fn=lr_schedule_for(config, 10), noise_scheduler=noise_scheduler_for(config), config=config
    )
    jitted, images_sharding = jit_train_step(step_fn, shardings, mesh)
    batch = (1, config.train_batch_size, 8, 8, 1)
    images = jax.ShapeDtypeStruct(batch, "uint8", sharding=images_sharding)
    text = jitted.lower(jax.tree.leaves(abstract), images, step_seed(config.seed, mesh)).compile().as_text()
    leaves = len(jax.tree_util.tree_leaves(abstract.params))
    # 74 leaves: about 300 `and`s with one flag, about 17,000 with a copy of the chain in every update.
    assert text.count(" and(") < 10 * leaves, text.count(" and(")


# --------------------------------------------------------------------------------------------------------------
# Whole compiled programs kept by `compile_or_load`: a later start loads them without tracing.


def _toy(traces, nonce=0.0):
    """A donated, sharded toy step on one device; `traces` counts how often Python runs its body (each trace).
    `nonce`, a constant in the program, makes it one that JAX's cache (shared by the suite and kept between runs)
    has not seen: a program loaded from there is not kept."""
    import jax

    mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, x):
        traces.append(1)
        return {"w": state["w"] * 0.5 + x.sum() + nonce}, (x * state["w"][0]).sum()

    jitted = jax.jit(step, in_shardings=(sharding, sharding), out_shardings=(sharding, sharding), donate_argnums=0)
    return jitted, sharding


def _toy_args():
    import jax.numpy as jnp

    return {"w": jnp.arange(1.0, 5.0)}, jnp.linspace(0.0, 1.0, 3)


def _kept(folder):
    return sorted(p.name for p in folder.glob("*.bin")) if folder.exists() else []


@pytest.fixture
def nonce():
    return float(int.from_bytes(os.urandom(3), "little"))


@pytest.fixture
def kept_dir(tmp_path, monkeypatch):
    """compile_or_load's folder, under tmp_path for this test."""
    from uncond_flax import compile_cache

    folder = tmp_path / "kept"
    monkeypatch.setattr(compile_cache, "executables_dir", lambda: str(folder))
    return folder


def test_a_kept_program_is_loaded_untraced_and_computes_and_donates_as_compiled(kept_dir, nonce):
    import numpy as np

    from uncond_flax.compile_cache import compile_or_load

    traces = []
    jitted, sharding = _toy(traces, nonce)
    state, x = _toy_args()
    compiled, facts, loaded = compile_or_load(
        jitted, (state, x), name="toy", shardings=(sharding, sharding), inputs={"v": 1}, info=lambda t: {"eqns": 7}
    )
    assert (len(traces), loaded, facts) == (1, None, {"eqns": 7})
    assert len(_kept(kept_dir)) == 1
    expected = compiled(state, x)

    jitted, _ = _toy(traces, nonce)  # a new jit, as a new process has: only the kept file can spare its trace
    state, x = _toy_args()
    again, facts, loaded = compile_or_load(
        jitted, (state, x), name="toy", shardings=(sharding, sharding), inputs={"v": 1}, info=lambda t: {"eqns": 0}
    )
    assert len(traces) == 1, "the kept program was traced again"
    assert loaded == str(kept_dir / _kept(kept_dir)[0]) and facts == {"eqns": 7}  # the facts of its trace
    got = again(state, x)
    assert state["w"].is_deleted()  # donated, as the jit says
    for a, b in zip(jax_leaves(expected), jax_leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax
    import numpy as np

    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_the_key_holds_what_the_trace_reads(monkeypatch, nonce):
    import jax
    import jax.numpy as jnp

    from uncond_flax.compile_cache import program_key

    _, sharding = _toy([], nonce)
    other_device = jax.sharding.NamedSharding(
        jax.make_mesh((1,), ("d",), devices=jax.devices()[1:2]), jax.sharding.PartitionSpec()
    )
    state, x = _toy_args()
    base = program_key("toy", (state, x), (sharding, sharding), {"v": 1})
    assert program_key("toy", (state, x), (sharding, sharding), {"v": 1}) == base
    assert program_key("toy", (state, jnp.zeros(3)), (sharding, sharding), {"v": 1}) == base  # values are not read
    changed = {
        "name": program_key("other", (state, x), (sharding, sharding), {"v": 1}),
        "inputs": program_key("toy", (state, x), (sharding, sharding), {"v": 2}),
        "shape": program_key("toy", (state, jnp.zeros(4)), (sharding, sharding), {"v": 1}),
        "dtype": program_key("toy", (state, jnp.zeros(3, jnp.int32)), (sharding, sharding), {"v": 1}),
        "tree": program_key("toy", ({"v": state["w"]}, x), (sharding, sharding), {"v": 1}),
        "devices": program_key("toy", (state, x), (other_device, sharding), {"v": 1}),
    }
    with jax.default_matmul_precision("highest"):
        changed["jax setting"] = program_key("toy", (state, x), (sharding, sharding), {"v": 1})
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2")
    changed["XLA_FLAGS"] = program_key("toy", (state, x), (sharding, sharding), {"v": 1})
    assert [what for what, key in changed.items() if key == base] == []
    assert len(set(changed.values())) == len(changed)


def test_the_key_follows_this_packages_source(tmp_path):
    import shutil

    import uncond_flax
    from uncond_flax.compile_cache import source_digest

    package = os.path.dirname(uncond_flax.__file__)
    copy = tmp_path / "uncond_flax"
    shutil.copytree(package, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    original = source_digest(package)
    assert source_digest(str(copy)) == original
    step_py = copy / "step.py"
    text = step_py.read_text()
    step_py.write_text(text.replace("loss_sum / accum", "loss_sum / accum / 2"))  # a deliberately broken step
    assert source_digest(str(copy)) != original
    step_py.write_text(text)
    assert source_digest(str(copy)) == original
    (copy / "models" / "extra.py").write_text("")
    assert source_digest(str(copy)) != original


def test_a_program_loaded_in_the_background_is_the_one_compile_or_load_returns(kept_dir, nonce):
    from uncond_flax.compile_cache import compile_or_load, load_in_background

    traces = []
    jitted, sharding = _toy(traces, nonce)
    kwargs = dict(name="toy", shardings=(sharding, sharding), inputs={"v": 1})
    assert load_in_background(args=_toy_args(), **kwargs).result() is None  # nothing kept yet
    expected = float(compile_or_load(jitted, _toy_args(), **kwargs)[0](*_toy_args())[1])
    assert len(traces) == 1

    loading = load_in_background(args=_toy_args(), **kwargs)
    compiled, _, loaded = compile_or_load(_toy(traces, nonce)[0], _toy_args(), loading=loading, **kwargs)
    assert len(traces) == 1 and loaded is not None
    assert compiled is loading.result()[0]  # not loaded a second time
    assert float(compiled(*_toy_args())[1]) == expected


def test_a_damaged_kept_file_warns_and_the_program_is_compiled_and_kept_again(kept_dir, caplog, nonce):
    from uncond_flax.compile_cache import compile_or_load

    traces = []
    jitted, sharding = _toy(traces, nonce)
    kwargs = dict(name="toy", shardings=(sharding, sharding), inputs={"v": 1})
    expected = float(compile_or_load(jitted, _toy_args(), **kwargs)[0](*_toy_args())[1])
    (name,) = _kept(kept_dir)
    data = (kept_dir / name).read_bytes()
    (kept_dir / name).write_bytes(data[: len(data) // 2])  # a copy cut short (a full disk, another tool)

    with caplog.at_level("WARNING", logger="uncond_flax"):
        compiled, _, loaded = compile_or_load(_toy(traces, nonce)[0], _toy_args(), **kwargs)
    assert loaded is None and len(traces) == 2
    assert f"toy: cannot load {kept_dir / name} (" in caplog.text and "); compiling it" in caplog.text
    assert float(compiled(*_toy_args())[1]) == expected
    assert (kept_dir / name).read_bytes() != data[: len(data) // 2]  # written again, whole
    assert compile_or_load(_toy(traces, nonce)[0], _toy_args(), **kwargs)[2] is not None and len(traces) == 2


def test_an_unwritable_folder_warns_and_the_compiled_program_runs(tmp_path, monkeypatch, caplog, nonce):
    from uncond_flax import compile_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(compile_cache, "executables_dir", lambda: str(blocker / "kept"))
    traces = []
    jitted, sharding = _toy(traces, nonce)
    with caplog.at_level("WARNING", logger="uncond_flax"):
        compiled, _, loaded = compile_cache.compile_or_load(
            jitted, _toy_args(), name="toy", shardings=(sharding, sharding), inputs={}
        )
    assert loaded is None and f"toy: not kept for the next start: cannot write {blocker}/kept/toy-" in caplog.text
    assert float(compiled(*_toy_args())[1]) == float(jitted(*_toy_args())[1])


def test_only_the_programs_used_last_are_kept(kept_dir, monkeypatch, nonce):
    import time

    from uncond_flax import compile_cache

    monkeypatch.setattr(compile_cache, "KEEP_PER_PROGRAM", 2)
    jitted, sharding = _toy([], nonce)

    def use(v, name="toy"):
        before = set(_kept(kept_dir))
        compile_cache.compile_or_load(jitted, _toy_args(), name=name, shardings=(sharding, sharding), inputs={"v": v})
        time.sleep(0.05)  # distinct modification times
        return (set(_kept(kept_dir)) - before).pop() if set(_kept(kept_dir)) - before else None

    v0, v1 = use(0), use(1)
    assert use(0) is None  # loaded: now the one used last
    other = use(0, name="other")
    v2 = use(2)
    assert set(_kept(kept_dir)) == {v0, v2, other} and v1 not in _kept(
        kept_dir
    )  # another program's file does not count


def test_a_program_on_devices_in_another_order_is_loaded_onto_them_in_that_order(kept_dir, nonce):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from uncond_flax.compile_cache import compile_or_load

    order = [3, 1, 2, 0, 7, 5, 6, 4]
    devices = np.array([jax.devices()[i] for i in order])
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)), jax.sharding.PartitionSpec("d"))

    def program():
        return jax.jit(lambda x: x * jnp.arange(8.0)[:, None] + nonce, in_shardings=sharding, out_shardings=sharding)

    x = jax.device_put(jnp.ones((8, 2)), sharding)
    expected = compile_or_load(program(), (x,), name="rows", shardings=(sharding,), inputs={})[0](x)
    compiled, _, loaded = compile_or_load(program(), (x,), name="rows", shardings=(sharding,), inputs={})
    assert loaded is not None
    got = compiled(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert [s.device.id for s in got.addressable_shards] == [s.device.id for s in expected.addressable_shards]
    assert [s.data[0, 0].item() - nonce for s in got.addressable_shards] == list(range(8))


def test_a_second_start_and_a_resume_load_the_kept_train_step_and_train_the_same_numbers(tmp_path, kept_dir, caplog):
    import jax
    import numpy as np

    from test_train import tiny_config
    from uncond_flax.train import train_and_evaluate

    common = dict(max_train_steps=4, checkpointing_steps=2, use_ema=True, save_images_epochs=1000)
    # A seed of its own: weights and noise no other run of the suite has drawn.
    common.update(save_model_epochs=1000, seed=int.from_bytes(os.urandom(3), "little"))
    loaded_line = re.compile(r"train_step loaded in [0-9.]+ s from " + re.escape(str(kept_dir)))

    flops = []

    def run(folder, **overrides):
        caplog.clear()
        with caplog.at_level("INFO", logger="uncond_flax"):
            state = train_and_evaluate(tiny_config(tmp_path / folder, **{**common, **overrides}))
        flops.append(caplog.text.split("FLOPs per step per device")[0].rsplit(" ", 2)[-2])
        return jax.tree.map(np.asarray, state), bool(loaded_line.search(caplog.text))

    def steps_kept():
        return [name for name in _kept(kept_dir) if name.startswith("train_step-")]

    first, loaded = run("a")
    assert not loaded and len(steps_kept()) == 1
    second, loaded = run("b")  # the same command again, into another folder
    assert loaded, caplog.text
    assert re.search(r"init_state loaded in [0-9.]+ s from " + re.escape(str(kept_dir)), caplog.text)  # weights
    assert flops[1] == flops[0] and float(flops[0]) > 0  # kept with the program: the log and the MFU have them
    resumed, loaded = run("a", resume_from_checkpoint="2")  # steps 3 and 4 again, from the checkpoint at 2
    assert loaded, caplog.text
    for other in (second, resumed):
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)

    # Another seed: the same step and init program (both take the seed's keys as arguments), loaded; other weights.
    init_line = re.compile(r"init_state loaded in [0-9.]+ s from ")
    seeded, loaded = run("d", seed=common["seed"] + 1)
    assert loaded and init_line.search(caplog.text) and len(steps_kept()) == 1, caplog.text
    pairs = zip(jax.tree.leaves(seeded.params), jax.tree.leaves(first.params), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)
    shutil.rmtree(kept_dir)
    fresh, loaded = run("e", seed=common["seed"] + 1)  # the same seed with nothing kept: the same numbers
    assert not loaded
    for a, b in zip(jax.tree.leaves(seeded), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)

    _, loaded = run("c", learning_rate=2e-3)  # another program: compiled, and kept beside the first
    assert not loaded and len(steps_kept()) == 2


# A fresh process: the cache in argv[1], a small program with functions of its own (tanh, a convolution) through
# compile_or_load; prints where it was loaded from and what it computes.
KEPT_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
logging.getLogger("uncond_flax").setLevel(logging.INFO)
import jax, jax.numpy as jnp
from uncond_flax.compile_cache import compile_or_load, enable_compile_cache
enable_compile_cache(sys.argv[1])
def f(x, w):
    for _ in range(3):
        x = jnp.tanh(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return jnp.sum(x * x)
args = (jnp.linspace(-1.0, 1.0, 4 * 8 * 8 * 4).reshape(4, 8, 8, 4), jnp.full((3, 3, 4, 4), 0.05))
compiled, _, loaded = compile_or_load(jax.jit(f), args, name="toy", shardings=None, inputs={"n": sys.argv[2]})
print("loaded:", loaded, flush=True)
print("result:", float(compiled(*args)).hex(), flush=True)
"""


def test_a_program_from_jaxs_cache_is_kept_and_runs_when_a_later_start_loads_it(tmp_path):
    """A kept key can change while the lowered program does not (an edited source file, another JAX setting): JAX's
    cache then serves the program. XLA:CPU cannot save again an executable it loaded (the copy fails when it runs:
    "Function ... not found"), so it is kept from the bytes JAX's cache holds, and the next start loads it."""
    cache = tmp_path / "jax"
    kept = cache / "uncond_flax_executables"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=ROOT)

    def start(inputs):
        out = subprocess.run(
            [sys.executable, "-c", KEPT_SCRIPT, str(cache), inputs],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr, re.search(r"result: (\S+)", out.stdout).group(1)

    first, reference = start("a")  # compiled: into JAX's cache, and kept under key "a"
    assert HIT not in first and len(_kept(kept)) == 1
    second, result = start("b")  # another key, the same program: JAX's cache serves it
    assert "not kept" not in second and "loaded: None" in second and result == reference
    assert len(_kept(kept)) == 2
    third, result = start("b")  # the copy kept from JAX's cache's bytes, loaded untraced, runs
    assert f"loaded: {kept}" in third and result == reference
    # The arrays' own small programs come from JAX's cache in both starts; the toy only in the second.
    assert second.count(HIT) == third.count(HIT) + 1


def test_the_steps_key_holds_every_field_but_the_loops_own_and_no_credentials(tmp_path):
    from fixtures import tiny_digits

    from uncond_flax.config import resolve_config
    from uncond_flax.step import NOT_READ_BY_THE_STEP, step_program_inputs

    base = resolve_config(tiny_digits.get_config())
    inputs = step_program_inputs(base, 10)
    assert step_program_inputs(base, 11) != inputs  # the learning-rate schedule's length
    same = resolve_config(tiny_digits.get_config())
    same.update(output_dir=str(tmp_path), resume_from_checkpoint="latest", save_images_epochs=3, log_every=1)
    same.update(hub_token="hf_secret_value", push_to_hub=True, hub_model_id="me/model", checkpointing_steps=7)
    same.update(cpu_reuse_memory=False, seed=1)  # the seed: an argument of the step
    assert step_program_inputs(same, 10) == inputs
    assert "hf_secret_value" not in repr(step_program_inputs(same, 10))
    for field, value in [("learning_rate", 5e-4), ("mixed_precision", "bf16"), ("use_ema", True)]:
        other = resolve_config(tiny_digits.get_config())
        other[field] = value
        assert step_program_inputs(other, 10) != inputs, field
    other = resolve_config(tiny_digits.get_config())
    other.model.norm_eps = 1e-6  # a model field that changes no shape
    assert step_program_inputs(other, 10) != inputs
    assert set(NOT_READ_BY_THE_STEP) <= set(base.keys())  # no stale names


def test_programs_are_kept_only_beside_a_local_jax_cache_that_is_on(tmp_path):
    import jax

    from uncond_flax.compile_cache import EXECUTABLES_SUBDIR, executables_dir

    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert executables_dir() == str(tmp_path / EXECUTABLES_SUBDIR)
        jax.config.update("jax_enable_compilation_cache", False)
        assert executables_dir() is None
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", "gs://bucket/jax-cache")  # tensorstore's, not a folder
        assert executables_dir() is None
        jax.config.update("jax_compilation_cache_dir", None)
        assert executables_dir() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_enable_compilation_cache", saved[1])
