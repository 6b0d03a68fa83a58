"""The course's pdm scripts: test, test-refsol, copy-test, post_install, fetch-model.

`pdm run test --week W --day D` copies `tests_refsol/test_week_W_day_D.py` into `tests/` and runs
it against the learner's package `tiny_llm`; `pdm run test-refsol` runs the graders in place
against the reference `tiny_llm_ref`. One environment variable, `TINY_LLM_SOLUTION`, is the switch
the graders read (see `tiny_llm_common.grading.solution`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFSOL_DIR = ROOT / "tests_refsol"
LEARNER_DIR = ROOT / "tests"
SOLUTION_ENV = "TINY_LLM_SOLUTION"


def _day_file(week: int, day: int) -> Path:
    return REFSOL_DIR / f"test_week_{week}_day_{day}.py"


def _graders_for(week: int | None, day: int | None) -> list[Path]:
    if day is not None and week is None:
        raise SystemExit("error: --day needs --week (e.g. --week 1 --day 3)")
    pattern = "test_week_*_day_*.py" if week is None else f"test_week_{week}_day_*.py"
    if day is not None:
        pattern = f"test_week_{week}_day_{day}.py"
    files = sorted(REFSOL_DIR.glob(pattern), key=_sort_key)
    if not files:
        raise SystemExit(f"error: no graders match {REFSOL_DIR.name}/{pattern}")
    return files


def _sort_key(path: Path) -> tuple[int, int]:
    m = re.match(r"test_week_(\d+)_day_(\d+)\.py", path.name)
    return (int(m.group(1)), int(m.group(2))) if m else (99, 99)


def _parse(prog: str, allow_paths: bool, argv: list[str] | None) -> argparse.Namespace:
    """Our options, then pytest's: `pdm run test --week 1 --day 2 -- -x -k rope`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog=f"pdm run {prog}", epilog="Arguments after -- go to pytest.")
    p.add_argument("--week", type=int, help="week number (1-3)")
    p.add_argument("--day", type=int, help="day number within the week")
    if allow_paths:
        p.add_argument(
            "paths", nargs="*", help="grader files, e.g. tests_refsol/test_week_3_day_2.py"
        )
    args, unknown = p.parse_known_args(argv[:cut])
    args.pytest_args = unknown + argv[cut + 1 :]
    return args


def _run_pytest(files: list[Path], solution: str, extra: list[str]) -> int:
    env = dict(os.environ)
    env[SOLUTION_ENV] = solution
    cmd = [sys.executable, "-m", "pytest", *map(str, files), *extra]
    print(f"[{solution}] {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


def copy_tests(week: int, day: int) -> Path:
    src = _day_file(week, day)
    if not src.exists():
        raise SystemExit(f"error: there are no graders for week {week} day {day} ({src.name})")
    LEARNER_DIR.mkdir(exist_ok=True)
    dst = LEARNER_DIR / src.name
    shutil.copyfile(src, dst)
    return dst


def cmd_copy_test(argv: list[str] | None = None) -> None:
    args = _parse("copy-test", False, argv)
    if args.week is None or args.day is None:
        raise SystemExit("usage: pdm run copy-test --week W --day D")
    print(f"copied to {copy_tests(args.week, args.day).relative_to(ROOT)}")


def cmd_test(argv: list[str] | None = None) -> None:
    """Grade the learner's code (src/tiny_llm) for one day, or a whole week."""
    args = _parse("test", False, argv)
    if args.week is None:
        raise SystemExit("usage: pdm run test --week W [--day D] [-- pytest args]")
    days = (
        [args.day]
        if args.day is not None
        else [_sort_key(f)[1] for f in _graders_for(args.week, None)]
    )
    files = [copy_tests(args.week, d) for d in days]
    sys.exit(_run_pytest(files, "tiny_llm", args.pytest_args))


def cmd_test_refsol(argv: list[str] | None = None) -> None:
    """Run the graders against the reference solution (src/tiny_llm_ref)."""
    args = _parse("test-refsol", True, argv)
    if args.paths:
        files = [Path(p).resolve() for p in args.paths]
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise SystemExit(f"error: no such grader file: {', '.join(missing)}")
        # Repository-wide checks (API mirror, book links) live beside the graders.
    else:
        files = _graders_for(args.week, args.day)
        if args.week is None:
            files += sorted(REFSOL_DIR.glob("test_course_*.py"))
    sys.exit(_run_pytest(files, "tiny_llm_ref", args.pytest_args))


def _fetch_model() -> Path:
    from tiny_llm_common.models import ModelLoadError
    from tiny_llm_common.models.smollm2 import ensure_smollm2_gguf

    try:
        return ensure_smollm2_gguf(verbose=True)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_fetch_model(argv: list[str] | None = None) -> None:
    print(_fetch_model())


def post_install() -> None:
    """Run by `pdm install`: fetch the default model and build the reference extension."""
    _fetch_model()
    from tiny_llm_common.build_ext import build

    try:
        build("ref")
    except SystemExit:
        # `pdm install -G cuda` swaps in MLX's CUDA library; the CUDA paged kernel needs no
        # extension (book/src/week3-cuda.md), so a build that fails there must not fail the install.
        import mlx.core as mx

        if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
            raise
        print(
            "note: the C++ extension did not build against CUDA MLX; the CUDA kernels do not need it"
        )
