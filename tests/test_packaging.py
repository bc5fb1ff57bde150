"""An installed wheel carries the data the code reads: the table contracts and the profiles."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from gaia_flows.layout import REPO_ROOT

CHECK = """
import gaia_flows, sys
from pathlib import Path
from gaia_flows.contracts import load_contract
from gaia_flows.profiles import list_profiles, load_profile
installed = Path(sys.argv[1])
assert Path(gaia_flows.__file__).is_relative_to(installed), gaia_flows.__file__
contract = load_contract()
assert contract.source.is_relative_to(installed) and len(contract.columns) == 152
profile = load_profile("local")
assert profile.source.is_relative_to(installed) and profile.spark_master
print(len(list_profiles()))
"""


def test_a_built_wheel_loads_the_contract_and_a_profile_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for name in ("gaia_flows", "data_contracts", "resources"):
        shutil.copytree(
            REPO_ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    uv = Path(sys.executable).with_name("uv")  # make install puts uv into the virtualenv
    build = subprocess.run(
        [str(uv), "build", "--wheel", "--quiet", "--out-dir", str(wheels), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("gaia_flows-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gaia_flows/data/contracts/gaia_source_dr3.yaml" in names
    assert "gaia_flows/data/profiles/profile.schema.json" in names
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)  # a pure wheel unpacked is an installed package
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(installed)],
        cwd=outside,
        env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == len(list((REPO_ROOT / "resources").glob("*.yaml")))
