"""Prove the learner path end to end, in a scratch copy of the repository:
1. the learner's extension skeleton (src/extensions) builds as shipped;
2. with the reference solution copied over the learner's stubs (Python modules and the extension's
   kernel sources), it rebuilds and the learner-mode graders (`pdm run test`) pass for every week.
So the stubs, the graders and the reference can never drift apart.

Usage: python scripts/check_learner_path.py [--week W]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_tree(scratch: Path) -> None:
    """Tracked and new files, without what git ignores (builds, .so, .venv)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src, dst = ROOT / name.decode(), scratch / name.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _copy_solution(scratch: Path) -> None:
    for src in (scratch / "src" / "tiny_llm_ref").glob("*.py"):
        text = (
            src.read_text()
            .replace("tiny_llm_ext_ref", "tiny_llm_ext")
            .replace("tiny_llm_ref", "tiny_llm")
        )
        (scratch / "src" / "tiny_llm" / src.name).write_text(text)
    ext_ref, ext = (
        scratch / "src" / "extensions_ref" / "src",
        scratch / "src" / "extensions" / "src",
    )
    if ext_ref.is_dir() and ext.is_dir():
        for src in ext_ref.iterdir():
            if src.suffix in (".cpp", ".h", ".metal") and (ext / src.name).exists():
                shutil.copyfile(src, ext / src.name)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--week", type=int, action="append", help="weeks to run (default: all)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tiny-llm-learner-") as tmp:
        scratch = Path(tmp) / "repo"
        _copy_tree(scratch)
        env = dict(os.environ, PYTHONPATH=str(scratch / "src"))
        run = lambda code: subprocess.call([sys.executable, "-c", code], cwd=scratch, env=env)  # noqa: E731
        build = "from tiny_llm_common.build_ext import build; build('learner')"
        if run(build):
            print("learner path: the extension skeleton does not build as shipped", file=sys.stderr)
            return 1
        _copy_solution(scratch)
        if run(build):
            print(
                "learner path: the skeleton with the reference kernels does not build",
                file=sys.stderr,
            )
            return 1
        weeks = args.week or sorted(
            {
                int(f.name.split("_")[2])
                for f in (scratch / "tests_refsol").glob("test_week_*_day_*.py")
            }
        )
        failed = []
        for week in weeks:
            code = f"from tiny_llm_common.devtools import cmd_test; cmd_test(['--week', '{week}'])"
            if run(code):
                failed.append(week)
        if failed:
            print(f"learner path: graders failed for week(s) {failed}", file=sys.stderr)
            return 1
        print(f"learner path: reference copied over the stubs passes weeks {weeks}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
