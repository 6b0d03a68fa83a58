"""ctypes mirrors of the structures in include/metalsim/abi.h (keep the two in step)."""

from __future__ import annotations

import ctypes as C

ABI_VERSION = 2
MAX_BINDINGS = 31
THREADGROUP_MEMORY_LIMIT = 32768
ROLE_BUFFER = 1
ROLE_THREADGROUP = 2
BIND_HOST_WRITEABLE = 1
BIND_BYTES = 2
MODES = {"fiber": 0, "thread": 1}


class Uint3(C.Structure):
    _fields_ = [("x", C.c_uint32), ("y", C.c_uint32), ("z", C.c_uint32)]


class Param(C.Structure):
    _fields_ = [
        ("role", C.c_int32),
        ("index", C.c_int32),
        ("name", C.c_char_p),
        ("line", C.c_int32),
    ]


class ParamLayout(C.Structure):
    _fields_ = [
        ("size", C.c_uint64),
        ("align", C.c_uint32),
        ("is_pointer", C.c_uint8),
        ("is_reference", C.c_uint8),
        ("is_const", C.c_uint8),
        ("reserved", C.c_uint8),
    ]


class Kernel(C.Structure):
    _fields_ = [
        ("host_name", C.c_char_p),
        ("function", C.c_char_p),
        ("entry", C.c_void_p),
        ("nparams", C.c_int32),
        ("params", C.POINTER(Param)),
        ("layouts", C.POINTER(ParamLayout)),
        ("file", C.c_char_p),
        ("line", C.c_int32),
        ("max_total_threads", C.c_uint32),
    ]


class KernelTable(C.Structure):
    _fields_ = [("abi_version", C.c_uint32), ("count", C.c_uint32), ("kernels", C.POINTER(Kernel))]


class Binding(C.Structure):
    _fields_ = [
        ("index", C.c_int32),
        ("flags", C.c_int32),
        ("data", C.c_void_p),
        ("nbytes", C.c_uint64),
        ("offset", C.c_uint64),
    ]


class Dispatch(C.Structure):
    _fields_ = [
        ("groups", Uint3),
        ("tpg", Uint3),
        ("grid_threads", Uint3),
        ("nonuniform", C.c_int32),
        ("mode", C.c_int32),
        ("nbuffers", C.c_int32),
        ("buffers", C.POINTER(Binding)),
        ("nthreadgroup", C.c_int32),
        ("threadgroup", C.POINTER(Binding)),
        ("stack_kib", C.c_uint32),
        ("timeout_s", C.c_uint32),
    ]
