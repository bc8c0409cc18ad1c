"""pyproject.toml builds a wheel that holds the whole package and the shipped configs, and whose console scripts
work from any directory once installed (into a target folder here: a fresh venv with every dependency is too slow)."""

import configparser
import email.parser
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from test_train import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources, and the checkout is shared.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("uncond_flax", "configs"):  # uncond_flax/configs stays the link to ../configs it is in git
        shutil.copytree(os.path.join(ROOT, name), src / name, symlinks=True, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("uncond_flax-*.whl")
    return path


def _sources(folder: str) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), ROOT)
        for d, _, files in os.walk(os.path.join(ROOT, folder))
        for f in files
        if f.endswith(".py")
    }


def test_wheel_holds_the_package_the_configs_and_the_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(f"{dist_info}/entry_points.txt").decode())

    package = {n for n in _sources("uncond_flax") if not n.startswith(os.path.join("uncond_flax", "configs", ""))}
    configs = {os.path.join("uncond_flax", n) for n in _sources("configs")}
    assert {
        os.path.join("uncond_flax", "configs", "digits.py"),
        os.path.join("uncond_flax", "cli.py"),
    } <= package | configs
    assert {n for n in names if n.endswith(".py")} == {n.replace(os.sep, "/") for n in package | configs}
    assert not any(n.startswith(("tests/", "configs/", "bench/")) for n in names)

    assert metadata["Name"] == "uncond-flax"
    assert metadata["Requires-Python"] == ">=3.11"
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("jax>=") for r in requires) and not any(
        r.startswith("torch") and "extra" not in r for r in requires
    )
    assert set(metadata.get_all("Provides-Extra")) == {"gcs", "tfds", "wandb", "test"}
    assert any(r.startswith("gcsfs") and 'extra == "gcs"' in r for r in requires)
    assert any(r.startswith("torch==2.13.0") and 'extra == "test"' in r for r in requires)
    assert dict(entry_points["console_scripts"]) == {
        "uncond-flax-train": "uncond_flax.cli:main",
        "uncond-flax-sample": "uncond_flax.sample:main",
        "uncond-flax-convert": "uncond_flax.convert:main",
    }


def test_requirements_files_point_at_pyproject_only():
    # One list of versions: the README's two install lines install the package and its extras.
    for name, target in (("requirements.txt", "-e ."), ("requirements-dev.txt", "-e .[test]")):
        with open(os.path.join(ROOT, name)) as f:
            lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        assert lines == [target], f"{name}: put dependencies into pyproject.toml, not {lines}"


def test_installed_console_scripts_run_from_any_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}

    def run(script, *args):
        return subprocess.run(
            [sys.executable, str(site / "bin" / script), *args], cwd=elsewhere, env=env, capture_output=True, text=True
        )

    train = run("uncond-flax-train", "--config=digits", "--help")
    assert train.returncode == 0, train.stderr
    # The shipped config, read from the installed package (not this checkout).
    assert f"values in {site / 'uncond_flax' / 'configs' / 'digits.py'}:" in train.stdout
    assert "\n  resolution" in train.stdout and train.stdout.startswith("usage: uncond-flax-train --config=CONFIG")
    for script in ("uncond-flax-sample", "uncond-flax-convert"):
        result = run(script, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
