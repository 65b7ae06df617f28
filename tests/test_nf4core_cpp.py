"""The standalone C++ library: build nf4core on its own with Meson and run its
C++ unit tests, the C header check and the pkg-config example (`meson test`)."""
import os
import pathlib
import shutil
import subprocess

import pytest

NF4CORE = pathlib.Path(__file__).resolve().parents[1] / "nf4core"


@pytest.mark.slow
def test_meson_test_of_standalone_nf4core(tmp_path):
    if shutil.which("meson") is None or shutil.which("ninja") is None:
        pytest.fail("meson and ninja are needed to build nf4core (pip install meson ninja)")
    if not (NF4CORE / "meson.build").exists():
        pytest.fail(f"nf4core sources not found at {NF4CORE}")
    build = tmp_path / "build"
    env = dict(os.environ)

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    run("meson", "setup", str(build), str(NF4CORE))
    run("meson", "compile", "-C", str(build), "-j", "2")
    out = run("meson", "test", "-C", str(build), "--print-errorlogs")
    assert "Fail:              0" in out or "Fail: 0" in " ".join(out.split()), out
