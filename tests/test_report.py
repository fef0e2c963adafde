"""The Snakemake HTML report of a demo run renders in a real (headless) browser.

Needs Debian's `chromium` (`make test` installs it when running as root); skipped without
it. Set ABLITERATE_UPDATE_SCREENSHOT=1 to refresh docs/report-screenshot.png.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from snakemake_runner import ROOT, snakemake
from test_workflow import run_workflow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
]


def without_scripts(html: str) -> str:
    return re.sub(r"<script\b.*?</script>", "", html, flags=re.S | re.I)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it as root)"
)
def test_html_report_renders_its_main_sections(tmp_path_factory, demo_dense, tmp_path):
    workdir = run_workflow(tmp_path_factory, demo_dense, "demo")
    report = workdir / "results" / "report.html"
    result = snakemake(workdir, "--report", str(report), "--cores", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report.stat().st_size > 50_000

    dom = chromium(tmp_path / "profile", "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = without_scripts(dom.stdout)  # what the page's JavaScript built
    assert "3. Sweep" not in without_scripts(report.read_text())  # ... and not the raw file
    sections = ("1. Checkpoint", "2. Analysis", "3. Sweep", "4. Sample answers", "5. Export")
    for section in (*sections, "Workflow", "abliterate run on"):
        assert section in rendered, section
    for caption_words in ("Pareto", "refusal rate", "sample answers", "model card"):
        assert caption_words.lower() in dom.stdout.lower(), caption_words  # embedded captions

    screenshot = tmp_path / "report.png"
    shot = chromium(
        tmp_path / "profile2",
        "--window-size=1400,900",
        f"--screenshot={screenshot}",
        report.as_uri(),
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000, shot.stderr[-2000:]
    if os.environ.get("ABLITERATE_UPDATE_SCREENSHOT") == "1":
        shutil.copy(screenshot, ROOT / "docs" / "report-screenshot.png")
