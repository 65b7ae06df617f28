"""The command line, run as a user would: a subprocess."""
import subprocess
import sys
import tempfile


def run(*args):
    # run outside the source tree, so the installed package is what runs
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "pyqlora", *args], capture_output=True, text=True, timeout=300,
                              cwd=cwd)


def test_demo_prints_the_comparison():
    proc = run("demo", "--rows", "256", "--cols", "512")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = {(l.split()[0], l.split()[1]): l.split() for l in lines if l.split()[:1] in (["nf4"], ["fp4"], ["int4"])}
    assert set(table) == {("nf4", "yes"), ("nf4", "no"), ("fp4", "no"), ("int4", "no")}
    assert float(table[("nf4", "yes")][2]) == 4.127 or abs(float(table[("nf4", "yes")][2]) - 4.127) < 2e-3
    assert float(table[("nf4", "no")][2]) == 4.5
    err = {k: float(v[3]) for k, v in table.items()}
    # on Gaussian weights NF4 is the most accurate 4-bit type (QLoRA, Sec. 3)
    assert err[("nf4", "no")] < err[("fp4", "no")] and err[("nf4", "no")] < err[("int4", "no")]
    assert "lowest error: nf4" in proc.stdout


def test_config_and_help():
    proc = run("config")
    assert proc.returncode == 0 and "nf4core" in proc.stdout
    assert run().returncode == 0
    bad = run("demo", "--blocksize", "48")
    assert bad.returncode == 2 and "blocksize must be one of" in bad.stderr
