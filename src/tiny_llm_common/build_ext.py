"""Build the course's MLX C++/Metal extensions: `pdm run build-ext` and `pdm run build-ext-ref`.

`build("ref")` configures and builds `src/extensions_ref/` into `src/extensions_ref/build/` with
CMake and Ninja (both installed in the project's environment from PyPI), then copies the Python
module `_ext*.so` (and, on macOS, `tiny_llm_ext_ref.metallib`) into `src/tiny_llm_ext_ref/`, where
`import tiny_llm_ext_ref` finds them. `build("learner")` does the same for `src/extensions/` and
`tiny_llm_ext`. Rebuilds are incremental.

A failed build prints the compiler's relevant lines and one line naming the cause, then exits
with a non-zero status (SystemExit), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[2]
MLX_SERIES = "0.32"  # the headers the extension is written against
NANOBIND_SERIES = "3.1"  # must match what MLX's own `core` module was built with

Which = Literal["ref", "learner"]


@dataclass(frozen=True)
class Extension:
    name: str  # the Python package, e.g. tiny_llm_ext_ref
    source_dir: Path  # holds CMakeLists.txt
    package_dir: Path  # where the built module is copied

    @property
    def build_dir(self) -> Path:
        return self.source_dir / "build"


def extension(which: Which, root: Path = ROOT) -> Extension:
    if which == "ref":
        return Extension(
            "tiny_llm_ext_ref", root / "src/extensions_ref", root / "src/tiny_llm_ext_ref"
        )
    if which == "learner":
        return Extension("tiny_llm_ext", root / "src/extensions", root / "src/tiny_llm_ext")
    raise ValueError(f"build(which={which!r}): expected 'ref' or 'learner'")


class BuildError(Exception):
    """A failed step: `cause` is the one line shown last, `details` the lines before it."""

    def __init__(self, cause: str, details: str = ""):
        super().__init__(cause)
        self.cause = cause
        self.details = details


def build(
    which: Which,
    *,
    build_dir: Path | None = None,
    clean: bool = False,
    verbose: bool = False,
    check_import: bool = True,
) -> Path:
    """Build one extension and install it into its package; return the installed module path.

    On failure prints the relevant compiler output and a one-line cause, and raises SystemExit(1).
    """
    ext = extension(which)
    try:
        return _build(
            ext, Path(build_dir) if build_dir else ext.build_dir, clean, verbose, check_import
        )
    except BuildError as e:
        if e.details:
            print(e.details.rstrip(), file=sys.stderr)
        print(f"error: building {ext.name} failed: {e.cause}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _build(ext: Extension, build_dir: Path, clean: bool, verbose: bool, check_import: bool) -> Path:
    _check_python_packages()
    cmake, ninja = _tool("cmake"), _tool("ninja")
    if clean and build_dir.exists():
        shutil.rmtree(build_dir)
    t0 = time.perf_counter()
    if not (build_dir / "CMakeCache.txt").exists():
        print(f"[build-ext] configuring {ext.name} in {_rel(build_dir)}", flush=True)
        cmd = [
            cmake,
            "-S",
            str(ext.source_dir),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            _run(cmd, verbose, step="configure")
        except BuildError:
            # A half-written cache would make the next attempt skip configuring.
            (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
            raise
    print(f"[build-ext] building {ext.name}", flush=True)
    _run([cmake, "--build", str(build_dir)], verbose, step="build")
    installed = _install(ext, build_dir)
    if check_import:
        _check_import(ext)
    print(
        f"[build-ext] {ext.name} ready in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(_rel(p) for p in installed),
        flush=True,
    )
    return installed[0]


def _check_python_packages() -> None:
    try:
        import mlx.core as mx
    except ImportError as e:
        raise BuildError(f"MLX is not importable ({e}); run `pdm install`") from None
    if not mx.__version__.startswith(MLX_SERIES + "."):
        raise BuildError(
            f"MLX version mismatch: mlx.__version__ is {mx.__version__}, the extension needs "
            f"{MLX_SERIES}.x (run `pdm install` to get the locked version)"
        )
    try:
        import nanobind
    except ImportError:
        raise BuildError("nanobind is not installed; run `pdm install`") from None
    if not nanobind.__version__.startswith(NANOBIND_SERIES + "."):
        raise BuildError(
            f"nanobind mismatch: nanobind {nanobind.__version__} is installed, MLX "
            f"{mx.__version__} needs {NANOBIND_SERIES}.x (run `pdm install`)"
        )


def _tool(name: str) -> str:
    """cmake/ninja: the environment's own (PyPI) copy first, then PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise BuildError(f"{name} not found: run `pdm install` (it installs {name} from PyPI)")
    return found


def _run(cmd: list[str], verbose: bool, step: str) -> None:
    """Run a CMake step; show Ninja's progress lines live, keep the rest for the error report."""
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", cwd=ROOT
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if verbose or re.match(r"\[\d+/\d+\] ", line):
            print("  " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise _diagnose(lines, step)


_ERROR_LINE = re.compile(r"error|Error|ERROR|FAILED|undefined reference|not found|No such file")


def _diagnose(lines: list[str], step: str) -> BuildError:
    text = "\n".join(lines)
    return BuildError(_cause(text, step), _relevant(lines))


# Ninja's progress lines and the (very long) compiler command lines.
_NOISE = re.compile(r"\[\d+/\d+\] |\S*(xcrun|c\+\+|g\+\+|clang\+\+)\s.*\s-c\s")


def _relevant(lines: list[str], limit: int = 40) -> str:
    """The error lines with a little context, at most `limit` lines, no progress noise."""
    keep: set[int] = set()
    for i, line in enumerate(lines):
        if _ERROR_LINE.search(line):
            keep.update(range(max(0, i - 1), min(len(lines), i + 3)))
    picked = [lines[i] for i in sorted(keep) if not _NOISE.match(lines[i])]
    if not picked:
        picked = lines[-limit:]
    if len(picked) > limit:
        picked = picked[:limit] + [f"... ({len(picked) - limit} more lines; rerun with --verbose)"]
    return "\n".join(picked)


def _cause(text: str, step: str) -> str:
    if "compiler specified in the environment variable CXX" in text:
        return (
            f"no C++ compiler: $CXX is {os.environ.get('CXX', '')!r}, which is not a compiler; "
            "unset it or point it at g++ or clang++"
        )
    if re.search(
        r"No CMAKE_CXX_COMPILER could be found|CMAKE_CXX_COMPILER.*(not a full path|not found)",
        text,
        re.S,
    ) or ("is not able to compile a simple test program" in text):
        return (
            "no C++ compiler: install one (Debian/Ubuntu: `apt-get install g++`; macOS: "
            "`xcode-select --install`) or fix $CXX"
        )
    if re.search(r"unable to find utility \"metal\"|xcrun: error.*metal", text):
        return (
            "the Metal compiler is missing: install Xcode (Xcode 26 also needs "
            "`xcodebuild -downloadComponent MetalToolchain`)"
        )
    if re.search(
        r"Could not find a package configuration file provided by \"MLX\"|MLX_DIR|libmlx\.so: cannot open",
        text,
    ):
        return "CMake cannot find MLX: on Linux install `mlx[cpu]` (run `pdm install`)"
    if "nanobind" in text and re.search(
        r"Could not find a package configuration file|nanobind_DIR", text
    ):
        return "CMake cannot find nanobind: run `pdm install`"
    m = re.search(r"^(\S+\.metal):(\d+):\d+: error", text, re.M)
    if m:
        return f"Metal compile error in {_rel(Path(m.group(1)))} line {m.group(2)} (see above)"
    m = re.search(r"^(\S+\.(?:cpp|h|hpp)):(\d+):\d+: error", text, re.M)
    if m:
        return f"C++ compile error in {_rel(Path(m.group(1)))} line {m.group(2)} (see above)"
    if "undefined reference" in text or "Undefined symbols" in text:
        return "link error: a declared function has no definition (see above)"
    return f"the CMake {step} step failed (see the output above; rerun with --verbose)"


def _install(ext: Extension, build_dir: Path) -> list[Path]:
    modules = sorted(build_dir.glob("_ext*.so")) + sorted(build_dir.glob("_ext*.pyd"))
    if not modules:
        raise BuildError(f"the build produced no _ext module in {_rel(build_dir)}")
    artifacts = [modules[0], *build_dir.glob(f"{ext.name}.metallib")]
    ext.package_dir.mkdir(parents=True, exist_ok=True)
    installed = []
    for src in artifacts:
        dst = ext.package_dir / src.name
        # Copy then rename: a process that has the old module loaded keeps a valid file.
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        installed.append(dst)
    return installed


def _check_import(ext: Extension) -> None:
    """Import the fresh module in a subprocess and build (not evaluate) one node.

    This is where a nanobind mismatch shows: it compiles, then every call rejects mx.array.
    """
    code = (
        "import mlx.core as mx\n"
        f"from {ext.name} import _ext\n"
        "_ext.swiglu(mx.zeros((2,)), mx.zeros((2,)))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ext.package_dir.parent), env.get("PYTHONPATH")])
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if r.returncode != 0:
        err = r.stderr.strip().splitlines()
        last = err[-1] if err else "(no output)"
        if "incompatible function arguments" in r.stderr:
            raise BuildError(
                "nanobind mismatch: the module rejects mx.array (it must be built with the "
                "nanobind MLX was built with, NB_DOMAIN mlx, no stable ABI)",
                "\n".join(err[-6:]),
            )
        raise BuildError(f"the built module does not import: {last}", "\n".join(err[-6:]))


def _rel(p: Path) -> str:
    p = Path(p)
    try:
        return str(p.resolve().relative_to(ROOT)) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--clean", action="store_true", help="delete the build folder first")
    p.add_argument(
        "--verbose", action="store_true", help="show CMake's and the compiler's full output"
    )
    p.add_argument("--build-dir", type=Path, help="build here instead of src/extensions*/build")
    return p


def cmd_build_ext(argv: list[str] | None = None) -> None:
    """`pdm run build-ext`: build the learner's extension (src/extensions -> tiny_llm_ext)."""
    args = _parser("pdm run build-ext").parse_args(argv)
    build("learner", build_dir=args.build_dir, clean=args.clean, verbose=args.verbose)


def cmd_build_ext_ref(argv: list[str] | None = None) -> None:
    """`pdm run build-ext-ref`: build the reference extension (src/extensions_ref -> tiny_llm_ext_ref)."""
    args = _parser("pdm run build-ext-ref").parse_args(argv)
    build("ref", build_dir=args.build_dir, clean=args.clean, verbose=args.verbose)


def main(argv: list[str] | None = None) -> None:
    """`python -m tiny_llm_common.build_ext {ref,learner} [--clean] [--verbose] [--build-dir DIR]`."""
    p = _parser("python -m tiny_llm_common.build_ext")
    p.add_argument("which", choices=["ref", "learner"])
    args = p.parse_args(argv)
    build(args.which, build_dir=args.build_dir, clean=args.clean, verbose=args.verbose)


if __name__ == "__main__":
    main()
