"""report.html in a real browser: headless Chromium loads it from disk, a script in the
page records every image's naturalWidth and every error into the DOM (--dump-dom), and a
screenshot is saved. Skipped with a visible reason when no Chromium is found, except
under CI=true, where it must run."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from collapse_ext.cli import main  # noqa: E402

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p),
    None,
)


def _chromium():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and no Chromium found (.ci/run installs the Debian package `chromium`)")
        pytest.skip("no Chromium found (install the Debian package `chromium` to run the browser test)")
    return CHROMIUM


def _browser(*args, profile):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check"]
    flags += [f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_loads_every_image_and_logs_no_error(tmp_path):
    chromium = _chromium()
    assert chromium
    g = torch.Generator().manual_seed(0)
    k, d, n = 8, 16, 2000
    means = 3 * torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    y[y >= 6] = torch.randint(0, 6, (int((y >= 6).sum()),), generator=g)  # classes 6, 7: minority
    y[:40] = 6 + torch.arange(40) % 2
    x = means[y] + torch.randn(n, d, generator=g)
    hidden = x + 2 * torch.randn(n, d, generator=g)
    np.savez(tmp_path / "f.npz", block=(hidden + 3 * torch.randn(n, d)).numpy(), hidden=hidden.numpy(), pen=x.numpy(),
             labels=y.numpy())  # fmt: skip
    np.save(tmp_path / "w.npy", (means + 0.5 * torch.randn(k, d, generator=g)).numpy())
    report = tmp_path / "report"
    argv = [
        "analyze",
        str(tmp_path / "f.npz"),
        "--features-key",
        "block,hidden,pen",
        "--weight",
        str(tmp_path / "w.npy"),
    ]
    assert main([*argv, "--report", str(report), "--quiet"]) == 0
    shot = _check_in_browser(report / "report.html", 5, tmp_path)
    target = os.environ.get("COLLAPSE_EXT_SCREENSHOT")
    if target:  # `COLLAPSE_EXT_SCREENSHOT=docs/report.png pytest tests/test_report_browser.py` refreshes the docs
        shutil.copyfile(shot, target)


def test_demo_report_loads_every_image_and_logs_no_error(tmp_path):
    """The report of `collapse-ext demo --report` (a few epochs). docs/demo_report.png is the
    same check's screenshot of the full `make demo` report (100 epochs): set
    COLLAPSE_EXT_DEMO_REPORT=demo_report to check that directory instead, and
    COLLAPSE_EXT_DEMO_SCREENSHOT=docs/demo_report.png to keep the screenshot."""
    assert _chromium()
    report = os.environ.get("COLLAPSE_EXT_DEMO_REPORT")
    if not report:
        report = tmp_path / "demo"
        assert main(["demo", "--epochs", "3", "--report", str(report), "--quiet"]) == 0
    shot = _check_in_browser(Path(report) / "report.html", 8, tmp_path)
    target = os.environ.get("COLLAPSE_EXT_DEMO_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


def _check_in_browser(path, images, tmp_path):
    """Load ``path`` in headless Chromium: ``images`` images, each loaded with a natural size,
    no error on the page or the console; returns the path of a screenshot."""
    page = path.resolve().as_uri()
    dom = _browser("--virtual-time-budget=5000", "--dump-dom", page, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="page-check">([^<]*)</pre>', dom.stdout)
    assert found and found.group(1), "the page's check script did not run"
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(check["images"]) == images
    assert all(img["ok"] and img["width"] > 0 for img in check["images"]), check
    assert check["errors"] == []
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line], dom.stderr

    shot = tmp_path / f"{path.parent.name}.png"
    run = _browser("--hide-scrollbars", "--window-size=1200,1500", f"--screenshot={shot}", page,
                   profile=tmp_path / "profile")  # fmt: skip
    assert run.returncode == 0 and shot.stat().st_size > 20_000
    with shot.open("rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return shot
