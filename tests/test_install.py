"""Install anywhere: the wheel carries the Hydra configs, and pyproject.toml declares what pid imports.

.ci/run does the full check (build the wheel, install it into a fresh venv, run the CLIs and a decode from a
temporary folder); these tests keep the pieces honest on every test run.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from the dev extra's `tomli`
    import tomli as tomllib

from pid.config_files import check_config_dir, config_dir
from pid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {"PIL": "pillow", "cv2": "opencv-python-headless", "hydra": "hydra-core", "yaml": "pyyaml"}
# Declared without being imported by pid, and why.
USED_WITHOUT_IMPORT = {"accelerate"}  # diffusers' enable_model_cpu_offload (from_ldm cpu_offload=true)


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _third_party_imports(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "pid":
                    found.add(top)
    return found


def test_config_dir_finds_the_checkout_configs():
    folder = config_dir()
    assert folder == ROOT / "configs"
    assert (folder / "from_ldm.yaml").is_file() and (folder / "from_clean.yaml").is_file()
    assert (folder / "backbone" / "flux.yaml").is_file()


def test_missing_configs_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"from_ldm\.yaml is not in .*reinstall pid"):
        check_config_dir(tmp_path, "from_ldm")


def test_every_package_and_config_goes_into_the_wheel():
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pid").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    assert setuptools_cfg["package-dir"]["pid.configs"] == "configs"
    patterns = setuptools_cfg["package-data"]["pid.configs"]
    for yaml_file in (ROOT / "configs").rglob("*.yaml"):
        relative = yaml_file.relative_to(ROOT / "configs")
        assert any(relative.match(p) for p in patterns), f"{relative} is not shipped by package-data"


def test_declared_dependencies_are_the_imported_ones():
    declared = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    optional = {
        _requirement_name(r) for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra
    }
    imported = {DISTRIBUTION_OF.get(name, name).lower().replace("_", "-") for name in _third_party_imports(ROOT / "pid")}
    undeclared = imported - declared - optional
    assert not undeclared, f"pid imports these but pyproject.toml does not declare them: {sorted(undeclared)}"
    unused = declared - imported - USED_WITHOUT_IMPORT
    assert not unused, f"declared but never imported by pid (move to an extra or drop): {sorted(unused)}"


def test_declared_lower_bounds_are_measured_ones():
    # .ci/run installs exactly these floors (.ci/floors.py) and runs the fast tests on them.
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from floors import declared_floors
    finally:
        sys.path.pop(0)
    floors = declared_floors(ROOT / "pyproject.toml")
    # 0.37.0 first had Flux2KleinPipeline; 0.39.0 first gave ZImagePipeline a schedule that ends above sigma 0.
    assert floors["diffusers"] == "0.39.0"
    assert all(re.fullmatch(r"[0-9][0-9.]*", v) for v in floors.values()), floors


@pytest.mark.slow
def test_wheel_works_from_another_folder(tmp_path):
    """Build the wheel, install it (no deps) into a folder, and start a CLI from elsewhere."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("pid-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pid/configs/from_ldm.yaml" in names and "pid/configs/backbone/flux.yaml" in names

    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import pid.config_files as c; print(c.config_dir())"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert where.stdout.strip() == str(target / "pid" / "configs"), where.stderr
    # The configs are found: an unknown backbone is reported with the shipped list of backbones.
    cli = subprocess.run(
        [sys.executable, "-m", "pid.inference.from_ldm", "backbone=nonexistent"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 2, cli.stderr
    assert "unknown backbone 'nonexistent'" in cli.stderr and "zimage-turbo" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_toml_parser_falls_back_to_tomli_without_tomllib():
    """Python 3.10 has no tomllib: this module must still import (with tomli) and parse pyproject.toml."""
    pytest.importorskip("tomli")
    code = (
        "import sys; sys.modules['tomllib'] = None; sys.path.insert(0, 'tests'); import test_install as t; "
        "print(t.tomllib.__name__, t.PYPROJECT['project']['name'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["tomli", "pid"]


def test_tested_python_versions_are_declared():
    classifiers = PYPROJECT["project"]["classifiers"]
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"
    for minor in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {minor}" in classifiers
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert any(r.replace(" ", "").startswith("tomli>=2.0;python_version<") for r in dev), dev
