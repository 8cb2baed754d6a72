"""Packaging: one version, build_info(), and a wheel that imports from outside the checkout.

The wheel test compiles the extension (CPU kernels only, ``USE_CUDA=0``: a few minutes on
two cores) in a copy of the sources, so it never touches the checkout's own build; it
runs in CI (``CI=true``) or with ``COLLAPSE_EXT_WHEEL_TEST=1`` (``make test-wheel``).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import collapse_ext

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once():
    text = (ROOT / "collapse_ext" / "_version.py").read_text()
    assert re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1) == collapse_ext.__version__
    assert "version=read_version()" in (ROOT / "setup.py").read_text()


def test_build_info_reports_the_build():
    info = collapse_ext.build_info()
    assert info["version"] == collapse_ext.__version__
    assert info["torch_running"] == torch.__version__
    assert info["cuda_compiled"] == collapse_ext.cuda_compiled()
    assert info["openmp_threads"] == torch.get_num_threads()
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # Without it every at::parallel_for of the CPU kernels runs on one thread.
        assert info["openmp_compiled"] is True
    assert info["torch_built"] == torch.__version__.split("+")[0]
    if not info["cuda_compiled"]:
        assert info["cuda_built"] is None and info["cuda_arch_list"] is None
    json.dumps(info)


def _sources(dest: Path) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "requirements-dev.txt"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("csrc", "collapse_ext"):
        shutil.copytree(
            ROOT / name,
            dest / name,
            ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"),
        )


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.environ.get("COLLAPSE_EXT_WHEEL_TEST") != "1",
    reason="builds a wheel (minutes): runs in CI or with COLLAPSE_EXT_WHEEL_TEST=1",
)
def test_wheel_builds_and_imports_outside_the_checkout(tmp_path):
    src, wheels, site, elsewhere = (tmp_path / d for d in ("src", "wheels", "site", "elsewhere"))
    for d in (src, wheels, site, elsewhere):
        d.mkdir()
    _sources(src)
    env = dict(os.environ, USE_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(src)],
        env=env,
        check=True,
    )
    (wheel,) = wheels.glob("collapse_ext-*.whl")
    assert wheel.name.startswith(f"collapse_ext-{collapse_ext.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("collapse_ext/_C") for n in names)
    assert not any(n.startswith(("csrc/", "tests/")) for n in names)
    subprocess.run([*pip, "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)], check=True)

    probe = (
        "import json, torch, collapse_ext\n"
        "x = torch.randn(50, 4, dtype=torch.float64); y = torch.arange(50) % 3\n"
        "counts, means, _ = collapse_ext.class_stats(x, y, 3)\n"
        "assert counts.tolist() == [17, 17, 16]\n"
        "print(json.dumps({'file': collapse_ext.__file__, 'info': collapse_ext.build_info()}))\n"
    )
    # Only the installed copy may be found: no checkout on the path, cwd elsewhere.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env=dict(clean, PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(site.resolve())
    info = report["info"]
    assert info["version"] == collapse_ext.__version__
    assert info["torch_built"] == torch.__version__.split("+")[0]
    assert info["cuda_compiled"] is False
    assert info["openmp_compiled"] is collapse_ext.build_info()["openmp_compiled"]  # the wheel's flags too
    assert info["compiler"]
