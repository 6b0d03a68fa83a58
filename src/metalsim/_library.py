"""A compiled kernel library: the kernels it holds and dispatching them on NumPy buffers."""

from __future__ import annotations

import ctypes as C
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _abi
from ._errors import MetalSimArgumentError, MetalSimRuntimeError, MetalSimTypeError

# Faults are caught with process-wide signal handlers that a dispatch installs and removes:
# one dispatch at a time per process.
_DISPATCH_LOCK = threading.Lock()
_ROLE_NAMES = {_abi.ROLE_BUFFER: "buffer", _abi.ROLE_THREADGROUP: "threadgroup"}


@dataclass(frozen=True)
class ParamInfo:
    name: str
    role: int  # _abi.ROLE_* or a built-in (>= 16)
    index: int
    size: int  # sizeof the pointee (pointers, references) or of the value
    is_pointer: bool
    is_reference: bool
    is_const: bool

    def describe(self) -> str:
        kind = _ROLE_NAMES.get(self.role)
        return f"[[{kind}({self.index})]] '{self.name}'" if kind else f"'{self.name}'"


@dataclass(frozen=True)
class KernelInfo:
    host_name: str
    function: str
    file: str
    line: int
    max_total_threads: int
    params: tuple[ParamInfo, ...]
    handle: C.c_void_p  # the ms_kernel in the library

    def buffer(self, index: int) -> ParamInfo | None:
        return next(
            (p for p in self.params if p.role == _abi.ROLE_BUFFER and p.index == index), None
        )


def _dims(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, int | np.integer):
        value = (int(value),)
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= 3:
        raise MetalSimTypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise MetalSimTypeError(f"{what} must hold ints, got {value!r}")
        if v < 1 or v > 0xFFFFFFFF:
            raise MetalSimArgumentError(f"{what} must be positive, got {tuple(value)}")
        dims.append(int(v))
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise MetalSimArgumentError(f"${name}={raw!r} is not an integer") from exc


class Library:
    """The kernels of one compiled .metal file (from metalsim.compile)."""

    def __init__(self, so_path: Path, source: Path):
        self.path = Path(source)
        self.so_path = Path(so_path)
        self._dll = C.CDLL(str(so_path))
        self._dll.metalsim_kernels.restype = C.POINTER(_abi.KernelTable)
        self._dll.metalsim_dispatch.restype = C.c_int
        self._dll.metalsim_dispatch.argtypes = [
            C.c_void_p,
            C.POINTER(_abi.Dispatch),
            C.c_char_p,
            C.c_size_t,
        ]
        self._dll.metalsim_runtime_info.restype = C.c_char_p
        table = self._dll.metalsim_kernels().contents
        if table.abi_version != _abi.ABI_VERSION:
            raise MetalSimRuntimeError(f"{so_path}: ABI version {table.abi_version}, expected 1")
        self._kernels: dict[str, KernelInfo] = {}
        for i in range(table.count):
            k = table.kernels[i]
            params = tuple(
                ParamInfo(
                    name=k.params[j].name.decode(),
                    role=k.params[j].role,
                    index=k.params[j].index,
                    size=k.layouts[j].size,
                    is_pointer=bool(k.layouts[j].is_pointer),
                    is_reference=bool(k.layouts[j].is_reference),
                    is_const=bool(k.layouts[j].is_const),
                )
                for j in range(k.nparams)
            )
            name = k.host_name.decode()
            self._kernels[name] = KernelInfo(
                host_name=name,
                function=k.function.decode(),
                file=k.file.decode(),
                line=k.line,
                max_total_threads=k.max_total_threads,
                params=params,
                handle=C.c_void_p(C.addressof(k)),
            )

    @property
    def kernels(self) -> list[str]:
        """Host names of the kernels, in source order."""
        return list(self._kernels)

    @property
    def fiber_implementation(self) -> str:
        return self._dll.metalsim_runtime_info().decode()

    def kernel_info(self, name: str) -> KernelInfo:
        try:
            return self._kernels[name]
        except KeyError:
            raise MetalSimArgumentError(
                f"{self.path.name} has no kernel named {name!r}; it has: {', '.join(self._kernels)}"
            ) from None

    def dispatch(
        self,
        name: str,
        grid,
        threads_per_threadgroup,
        buffers: Mapping | None = None,
        threadgroup_memory: Mapping | None = None,
        *,
        buffer_offsets: Mapping | None = None,
        mode: str | None = None,
    ) -> None:
        """dispatchThreadgroups: `grid` counts threadgroups. NumPy buffers are written in place.

        buffers: {index: C-contiguous NumPy array (bfloat16 as np.uint16) or bytes/NumPy
        scalar (set_bytes)}; threadgroup_memory: {index: nbytes} for [[threadgroup(i)]];
        buffer_offsets: {index: byte offset} the kernel's pointer starts at (setBuffer:offset:);
        mode: "fiber" (default, $METALSIM_MODE) or "thread" (one OS thread per GPU thread).
        """
        groups = _dims(grid, "grid")
        tpg = _dims(threads_per_threadgroup, "threads_per_threadgroup")
        total = tuple(g * t for g, t in zip(groups, tpg, strict=True))
        self._run(
            name, groups, tpg, total, False, buffers, threadgroup_memory, buffer_offsets, mode
        )

    def dispatch_threads(
        self,
        name: str,
        threads,
        threads_per_threadgroup,
        buffers: Mapping | None = None,
        threadgroup_memory: Mapping | None = None,
        *,
        buffer_offsets: Mapping | None = None,
        mode: str | None = None,
    ) -> None:
        """dispatchThreads: `threads` counts threads; the last threadgroups may be partial and
        report their actual size in [[threads_per_threadgroup]]. Arguments as for dispatch."""
        total = _dims(threads, "threads")
        tpg = _dims(threads_per_threadgroup, "threads_per_threadgroup")
        groups = tuple(-(-n // t) for n, t in zip(total, tpg, strict=True))
        self._run(name, groups, tpg, total, True, buffers, threadgroup_memory, buffer_offsets, mode)

    # ---------------------------------------------------------------------------------------
    def _run(
        self, name, groups, tpg, total, nonuniform, buffers, threadgroup_memory, offsets, mode
    ):
        k = self.kernel_info(name)
        nthreads = tpg[0] * tpg[1] * tpg[2]
        if nthreads > 1024:
            raise MetalSimArgumentError(
                f"threads_per_threadgroup {tpg} has {nthreads} threads; a threadgroup has at most 1024"
            )
        if k.max_total_threads and nthreads > k.max_total_threads:
            raise MetalSimArgumentError(
                f"threads_per_threadgroup {tpg} has {nthreads} threads, but '{name}' declares "
                f"[[max_total_threads_per_threadgroup({k.max_total_threads})]]"
            )
        mode = mode or os.environ.get("METALSIM_MODE", "fiber")
        if os.environ.get("METALSIM_SANITIZE") == "thread":
            mode = "thread"  # ThreadSanitizer cannot follow fibers
        if mode not in _abi.MODES:
            raise MetalSimArgumentError(f"mode must be 'fiber' or 'thread', got {mode!r}")

        bindings, keep = self._buffer_bindings(k, buffers, offsets)
        tg = self._threadgroup_bindings(k, threadgroup_memory)

        desc = _abi.Dispatch()
        desc.groups = _abi.Uint3(*groups)
        desc.tpg = _abi.Uint3(*tpg)
        desc.grid_threads = _abi.Uint3(*total)
        desc.nonuniform = int(nonuniform)
        desc.mode = _abi.MODES[mode]
        buf_array = (_abi.Binding * max(len(bindings), 1))(*bindings)
        tg_array = (_abi.Binding * max(len(tg), 1))(*tg)
        desc.nbuffers = len(bindings)
        desc.buffers = buf_array
        desc.nthreadgroup = len(tg)
        desc.threadgroup = tg_array
        desc.stack_kib = _env_int("METALSIM_STACK_KIB", 128)
        desc.timeout_s = _env_int("METALSIM_TIMEOUT_S", 600)
        err = C.create_string_buffer(4096)
        with _DISPATCH_LOCK:
            rc = self._dll.metalsim_dispatch(k.handle, C.byref(desc), err, len(err))
        del keep
        if rc != 0:
            raise MetalSimRuntimeError(f"metalsim: {err.value.decode(errors='replace')}")

    def _buffer_bindings(self, k: KernelInfo, buffers: Mapping | None, offsets: Mapping | None):
        buffers = {} if buffers is None else buffers
        offsets = {} if offsets is None else offsets
        if not isinstance(buffers, Mapping):
            raise MetalSimTypeError(
                f"buffers must be a dict {{index: array}}, got {type(buffers).__name__}"
            )
        if not isinstance(offsets, Mapping):
            raise MetalSimTypeError("buffer_offsets must be a dict {index: byte offset}")
        for index, off in offsets.items():
            if index not in buffers:
                raise MetalSimArgumentError(
                    f"buffer_offsets[{index}] is given, but buffer {index} is not bound"
                )
            if isinstance(off, bool) or not isinstance(off, int | np.integer) or off < 0:
                raise MetalSimTypeError(
                    f"buffer_offsets[{index}] must be a non-negative int, got {off!r}"
                )
        bindings, keep = [], []
        for index, value in buffers.items():
            if isinstance(index, bool) or not isinstance(index, int | np.integer):
                raise MetalSimTypeError(f"buffer indices must be ints, got {index!r}")
            p = k.buffer(int(index))
            if p is None:
                declared = sorted(q.index for q in k.params if q.role == _abi.ROLE_BUFFER)
                raise MetalSimArgumentError(
                    f"buffer {index} is bound, but kernel '{k.host_name}' has no [[buffer({index})]] "
                    f"parameter (it declares buffers {declared})"
                )
            flags = 0
            if isinstance(value, np.ndarray):
                if value.dtype.hasobject:
                    raise MetalSimTypeError(
                        f"{p.describe()}: arrays of Python objects cannot be bound"
                    )
                if not value.flags.c_contiguous:
                    raise MetalSimTypeError(
                        f"{p.describe()}: the array must be C-contiguous (use np.ascontiguousarray)"
                    )
                data, nbytes = value.ctypes.data, value.nbytes
                if value.flags.writeable:
                    flags |= _abi.BIND_HOST_WRITEABLE
                keep.append(value)
            elif isinstance(value, bytes | bytearray | np.generic):
                raw = value.tobytes() if isinstance(value, np.generic) else bytes(value)
                if len(raw) > 4096:
                    raise MetalSimArgumentError(
                        f"{p.describe()}: {len(raw)} bytes of set_bytes data; Metal allows 4 KiB "
                        "(bind a NumPy array instead, as a buffer)"
                    )
                buf = C.create_string_buffer(raw, len(raw))
                data, nbytes = C.addressof(buf), len(raw)
                flags |= _abi.BIND_BYTES
                keep.append(buf)
            else:
                raise MetalSimTypeError(
                    f"{p.describe()}: bind a NumPy array or bytes, not {type(value).__name__}"
                )
            offset = int(offsets.get(index, 0))
            if offset > nbytes:
                raise MetalSimArgumentError(
                    f"{p.describe()}: offset {offset} is past the end of its {nbytes} bytes"
                )
            if p.is_reference and nbytes - offset < p.size:
                raise MetalSimArgumentError(
                    f"{p.describe()} is a reference to {p.size} bytes, but {nbytes - offset} bytes are bound"
                )
            bindings.append(_abi.Binding(int(index), flags, data, nbytes, offset))
        for p in k.params:
            if p.role == _abi.ROLE_BUFFER and int(p.index) not in {b.index for b in bindings}:
                raise MetalSimArgumentError(
                    f"kernel '{k.host_name}' needs {p.describe()}, which is not bound"
                )
        return bindings, keep

    def _threadgroup_bindings(self, k: KernelInfo, memory: Mapping | None):
        memory = {} if memory is None else memory
        if not isinstance(memory, Mapping):
            raise MetalSimTypeError("threadgroup_memory must be a dict {index: nbytes}")
        out, total = [], 0
        for index, nbytes in memory.items():
            if not isinstance(index, int | np.integer) or not isinstance(nbytes, int | np.integer):
                raise MetalSimTypeError(
                    "threadgroup_memory must map int indices to int byte counts"
                )
            if not any(p.role == _abi.ROLE_THREADGROUP and p.index == index for p in k.params):
                raise MetalSimArgumentError(
                    f"threadgroup memory {index} is given, but kernel '{k.host_name}' has no "
                    f"[[threadgroup({index})]] parameter"
                )
            if nbytes < 0 or nbytes % 16:
                raise MetalSimArgumentError(
                    f"[[threadgroup({index})]]: {nbytes} bytes; Metal needs a multiple of 16"
                )
            total += int(nbytes)
            out.append(_abi.Binding(int(index), 0, None, int(nbytes)))
        if total > _abi.THREADGROUP_MEMORY_LIMIT:
            raise MetalSimArgumentError(
                f"threadgroup memory: {total} bytes requested, a threadgroup has 32 KiB (32768)"
            )
        for p in k.params:
            if p.role == _abi.ROLE_THREADGROUP and p.index not in {b.index for b in out}:
                raise MetalSimArgumentError(
                    f"kernel '{k.host_name}' needs {p.describe()}: give its size in "
                    "threadgroup_memory={index: nbytes}"
                )
        return out
