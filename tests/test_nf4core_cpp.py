"""The standalone C++ library: build nf4core on its own with Meson and run its
C++ unit tests, the C header check and the pkg-config example (`meson test`);
and, where an aarch64 cross compiler and qemu-user are installed (.ci/run
installs them), the same tests for aarch64, which run the NEON kernels."""
import os
import pathlib
import shutil
import subprocess

import pytest

NF4CORE = pathlib.Path(__file__).resolve().parents[1] / "nf4core"


def _meson_build_and_test(tmp_path, *setup_args):
    if shutil.which("meson") is None or shutil.which("ninja") is None:
        pytest.fail("meson and ninja are needed to build nf4core (pip install meson ninja)")
    if not (NF4CORE / "meson.build").exists():
        pytest.fail(f"nf4core sources not found at {NF4CORE}")
    build = tmp_path / "build"

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    run("meson", "setup", str(build), str(NF4CORE), *setup_args)
    run("meson", "compile", "-C", str(build), "-j", "2")
    out = run("meson", "test", "-C", str(build), "--print-errorlogs")
    summary = " ".join(out.split())
    assert "Fail: 0" in summary and "Ok: 0" not in summary, out
    return out


@pytest.mark.slow
def test_meson_test_of_standalone_nf4core(tmp_path):
    out = _meson_build_and_test(tmp_path)
    assert "paths" in out and "pkgconfig_example" in out
    assert "c_api_edges" in out  # every public C function at the edges of its arguments (issue 18)


@pytest.mark.slow
def test_aarch64_neon_build_under_qemu(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (Debian packages; .ci/run installs them)")
    out = _meson_build_and_test(tmp_path, "--cross-file", str(NF4CORE / "cross" / "aarch64-linux-gnu.ini"))
    assert "paths" in out and "matmul_isa" in out  # matmul_isa runs the NEON kernels
