"""Compiling: the system C++ compiler, a precompiled shim header, the runtime objects, and a
cache of kernel libraries keyed by a hash of everything that goes into them.

Layout of the cache ($METALSIM_CACHE, else <repo>/.metalsim-cache, else ~/.cache/metalsim):
  support/<key>/   metalsim_pch.h(.gch|.pch) and the runtime objects, per compiler+shim+flags
  kernels/<stem>-<key>/   unit.cpp (the translated source, for reading) and kernels.so
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ._errors import MetalSimCompileError
from ._source import translate

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"
RUNTIME_DIR = PACKAGE_DIR / "runtime"
RUNTIME_SOURCES = ("fiber.cpp", "group.cpp", "dispatch.cpp")
# What MSL code may test for: Metal 3.1 (bfloat), and that it runs under metalsim.
FEATURE_MACROS = ("-D__METALSIM__=1", "-D__METAL_VERSION__=310", "-D__HAVE_BFLOAT__=1")
PCH_HEADER = '#include "metalsim/glue.h"\n#include <metal_stdlib>\n'


def cache_dir() -> Path:
    env = os.environ.get("METALSIM_CACHE")
    if env:
        return Path(env)
    repo = PACKAGE_DIR.parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".metalsim-cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metalsim"


@dataclass(frozen=True)
class Toolchain:
    cxx: str
    version: str
    is_clang: bool
    fiber_impl: str  # "asm" or "ucontext" ($METALSIM_FIBER_IMPL)
    sanitize: str  # "" or "thread" ($METALSIM_SANITIZE)

    def base_flags(self) -> list[str]:
        flags = ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing"]
        flags += ["-fno-math-errno", *FEATURE_MACROS, f"-I{INCLUDE_DIR}"]
        flags += ["-O1", "-g"] if self.sanitize == "thread" else ["-O2"]
        return flags

    def kernel_flags(self) -> list[str]:
        # Uninitialised private variables read as a pattern (NaN for floats), not as zero.
        flags = self.base_flags() + ["-ftrivial-auto-var-init=pattern", "-Winvalid-pch"]
        if self.sanitize == "thread":
            flags.append("-fsanitize=thread")  # the kernel's accesses; the runtime stays plain
        flags += ["-Wno-unknown-attributes"] if self.is_clang else ["-Wno-attributes"]
        return flags + ["-Wno-unknown-pragmas"]

    def runtime_flags(self) -> list[str]:
        flags = self.base_flags()
        if self.fiber_impl == "ucontext":
            flags.append("-DMETALSIM_UCONTEXT=1")
        if self.sanitize == "thread":
            flags.append("-DMETALSIM_TSAN=1")
        return flags

    def ident(self) -> str:
        return "\n".join([self.cxx, self.version, self.fiber_impl, self.sanitize, sys.platform])


@functools.cache
def _toolchain(cxx_env: str | None, fiber_impl: str, sanitize: str) -> Toolchain:
    candidates = [cxx_env] if cxx_env else ["c++", "g++", "clang++"]
    for cxx in candidates:
        path = shutil.which(cxx)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0:
            version = out.stdout.strip()
            return Toolchain(path, version, "clang" in version.lower(), fiber_impl, sanitize)
    raise MetalSimCompileError(
        "metalsim needs a C++20 compiler (g++ >= 12 or clang++ >= 15) on PATH, or $CXX: none found"
    )


def _check_tsan_loaded() -> None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return  # not Linux: let the loader complain
    if "libtsan" not in maps:
        raise MetalSimCompileError(
            "METALSIM_SANITIZE=thread needs ThreadSanitizer's runtime loaded first: run Python as "
            "LD_PRELOAD=$(g++ -print-file-name=libtsan.so) python ..."
        )


def toolchain() -> Toolchain:
    fiber_impl = os.environ.get("METALSIM_FIBER_IMPL", "asm")
    if fiber_impl not in ("asm", "ucontext"):
        raise MetalSimCompileError(f"METALSIM_FIBER_IMPL={fiber_impl!r}: use 'asm' or 'ucontext'")
    sanitize = os.environ.get("METALSIM_SANITIZE", "")
    if sanitize not in ("", "thread"):
        raise MetalSimCompileError(f"METALSIM_SANITIZE={sanitize!r}: only 'thread' is supported")
    if sanitize:
        _check_tsan_loaded()
    return _toolchain(os.environ.get("CXX"), fiber_impl, sanitize)


@functools.cache
def _digest(paths: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for f in paths:
        h.update(str(f.relative_to(PACKAGE_DIR)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _shim_digest() -> str:
    """The shim headers and the runtime: what the precompiled header and objects are built from."""
    files = [
        f for root in (INCLUDE_DIR, RUNTIME_DIR) for f in sorted(root.rglob("*")) if f.is_file()
    ]
    return _digest(tuple(files))


def _translator_digest() -> str:
    """The Python that rewrites the source: a change to it must not reuse old libraries."""
    return _digest((PACKAGE_DIR / "_source.py", PACKAGE_DIR / "_build.py"))


def _support_key(tc: Toolchain) -> str:
    h = hashlib.sha256()
    for part in (
        tc.ident(),
        " ".join(tc.kernel_flags()),
        " ".join(tc.runtime_flags()),
        _shim_digest(),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stats_path() -> Path:
    return cache_dir() / "timings.json"


def _read_stats() -> dict:
    try:
        return json.loads(_stats_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_stat(name: str, seconds: float) -> None:
    stats = _read_stats()
    stats[name] = round(seconds, 2)
    with contextlib.suppress(OSError):
        _stats_path().write_text(json.dumps(stats))


def _run(cmd: list[str], what: str, display: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MetalSimCompileError(_compiler_message(what, display, proc.stderr))


def _compiler_message(what: str, display: str, stderr: str, limit: int = 60) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln and display in ln), None)
    first = first or next((ln for ln in lines if "error" in ln), "")
    head = f"metalsim: {what} failed"
    if first:
        head += f": {first.strip()}"
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    return head + "\n" + "\n".join(lines)


def preprocess(
    tc: Toolchain, path: Path, defines: dict[str, str], include_dirs: tuple[Path, ...]
) -> str:
    """The .metal file with the user's macros expanded and <metal_stdlib> empty."""
    cmd = [tc.cxx, "-E", "-x", "c++", "-std=c++20", "-D__METALSIM_PP__=1", *FEATURE_MACROS]
    cmd += [f"-D{k}={v}" for k, v in defines.items()]
    cmd += [f"-I{d}" for d in include_dirs] + [f"-I{INCLUDE_DIR}", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MetalSimCompileError(_compiler_message("preprocessing", str(path), proc.stderr))
    return proc.stdout


def ensure_support(tc: Toolchain) -> Path:
    """The precompiled shim header and the runtime objects for this toolchain, built once."""
    key = _support_key(tc)
    root = cache_dir() / "support"
    final = root / key
    if (final / "ok").is_file():
        return final
    with _locked(root / f"{key}.lock"):
        if (final / "ok").is_file():
            return final
        # Built in place (clang's precompiled header remembers its own path); the "ok" file,
        # written last, marks a complete build.
        start = time.perf_counter()
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir(parents=True)
        header = final / "metalsim_pch.h"
        header.write_text(PCH_HEADER)
        pch = final / ("metalsim_pch.h.pch" if tc.is_clang else "metalsim_pch.h.gch")
        jobs = [
            (
                [*tc.kernel_flags(), "-x", "c++-header", str(header), "-o", str(pch)],
                "precompiling the shim headers",
            )
        ]
        for src in RUNTIME_SOURCES:
            obj = final / (Path(src).stem + ".o")
            cmd = [*tc.runtime_flags(), "-c", str(RUNTIME_DIR / src), "-o", str(obj)]
            jobs.append((cmd, f"compiling {src}"))
        procs = [
            (subprocess.Popen([tc.cxx, *cmd], stderr=subprocess.PIPE, text=True), what)
            for cmd, what in jobs
        ]
        errors = []
        for proc, what in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                errors.append(_compiler_message(what, "metalsim", err))
        if errors:
            shutil.rmtree(final, ignore_errors=True)
            raise MetalSimCompileError("\n".join(errors))
        (final / "ok").write_text("")
        _write_stat("support_s", time.perf_counter() - start)
    return final


def _estimate(needs_support: bool) -> float:
    stats = _read_stats()
    est = float(stats.get("kernel_s", 2.0))
    if needs_support:
        est += float(stats.get("support_s", 8.0))
    return est


@dataclass
class Built:
    so: Path
    kernel_dir: Path


def build(
    path: Path, defines: dict[str, str], include_dirs: tuple[Path, ...], quiet: bool = False
) -> Built:
    """Compile `path` into a kernel library, or find it in the cache."""
    tc = toolchain()
    display = str(path)
    pp = preprocess(tc, path, defines, include_dirs)
    h = hashlib.sha256()
    for part in (pp, _support_key(tc), _translator_digest(), display):
        h.update(part.encode())
        h.update(b"\0")
    kdir = cache_dir() / "kernels" / f"{path.stem}-{h.hexdigest()[:20]}"
    so = kdir / "kernels.so"
    if so.is_file():
        return Built(so, kdir)
    translation = translate(pp, display)  # source errors surface before any compiling
    needs_support = not (cache_dir() / "support" / _support_key(tc) / "ok").is_file()
    if not quiet:
        print(
            f"metalsim: compiling {path.name} (first time, ~{max(1, round(_estimate(needs_support)))}s)",
            file=sys.stderr,
            flush=True,
        )
    support = ensure_support(tc)
    with _locked(kdir.with_name(kdir.name + ".lock")):
        if so.is_file():
            return Built(so, kdir)
        start = time.perf_counter()
        kdir.mkdir(parents=True, exist_ok=True)
        unit = kdir / "unit.cpp"
        unit.write_text(translation.cpp)
        tmp_so = kdir / f"kernels.so.tmp{os.getpid()}"
        objs = [str(support / (Path(s).stem + ".o")) for s in RUNTIME_SOURCES]
        cmd = [tc.cxx, *tc.kernel_flags(), "-shared", "-include", str(support / "metalsim_pch.h")]
        cmd += ["-x", "c++", str(unit), "-x", "none", *objs, "-o", str(tmp_so), "-lpthread"]
        try:
            _run(cmd, f"compiling {path.name}", display)
        except MetalSimCompileError:
            tmp_so.unlink(missing_ok=True)
            raise
        os.replace(tmp_so, so)
        _write_stat("kernel_s", time.perf_counter() - start)
    return Built(so, kdir)
