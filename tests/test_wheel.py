"""The wheel installs and runs without the source tree (issue 17 item 7).

`make wheel` packages the extension built here (CPU kernels and CUDA kernels
for sm_80/sm_90) with the run-time files the package reads (the kernel headers
the CuPy backend compiles, the benchmark scripts `fastspike bench` runs). This
test installs that wheel into a fresh virtual environment outside the
checkout (torch and the other dependencies borrowed from the running
interpreter's site-packages through a .pth file, nothing downloaded) and runs
the operator tests and `fastspike demo --quick` from there.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = sorted(glob.glob(os.path.join(ROOT, "dist", "fastspike-*.whl")), key=os.path.getmtime)

pytestmark = pytest.mark.skipif(not WHEELS, reason="no wheel in dist/: run `make wheel` (make test does)")


def _run(cmd, cwd, env=None, timeout=900):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    # The dependencies (torch, numpy, ...) from this interpreter's site-packages. A .pth
    # line adds the directory without running its own .pth files, so the checkout's
    # editable install of fastspike is not visible in the new environment.
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
          WHEELS[-1]], cwd=tmp_path)

    work = tmp_path / "work"  # no csrc/, benchmarks/ or fastspike/ next to it
    shutil.copytree(os.path.join(ROOT, "tests"), work / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "test_wheel.py"))
    env = dict(os.environ, FASTSPIKE_BACKEND="", FASTSPIKE_LIBRARY="", FASTSPIKE_JIT="0",
               PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1")
    where = _run([python, "-c", "import fastspike, fastspike._build as b, json; print(json.dumps("
                  "[fastspike.__file__, fastspike.backend_info()['backend'], b.CSRC, b.BENCHMARKS]))"],
                 cwd=work, env=env).stdout
    import json

    package, backend, csrc, benchmarks = json.loads(where.strip().splitlines()[-1])
    assert package.startswith(str(venv)) and backend == "extension"
    assert csrc.startswith(str(venv))
    from fastspike.cupy_backend import _KERNEL_FILES  # every header the CuPy/NVRTC path inlines is shipped

    for relative in _KERNEL_FILES:
        assert os.path.isfile(os.path.join(csrc, relative)), relative
    assert os.path.isfile(os.path.join(benchmarks, "bench_neurons.py")) and benchmarks.startswith(str(venv))

    _run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_semantics.py",
          "tests/test_errors.py", "tests/test_operator_checks.py"], cwd=work, env=env)
    _run([python, "-m", "fastspike", "demo", "--quick", "--out", str(tmp_path / "demo")], cwd=work, env=env)
    assert (tmp_path / "demo" / "demo.json").is_file()
