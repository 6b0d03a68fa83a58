"""Run an extension's recorded Metal dispatch through the Metal-on-CPU harness (`metalsim`).

Every GPU op of the extension writes its dispatch once, against the `Encoder` interface in
`src/extensions*/src/encoder.h`. On a Mac, `eval_gpu` runs it with MLX's Metal command encoder;
everywhere, `_plan_<op>(...)` runs it with a recording encoder and returns the commands as a list
of dicts:

    {"kernel": "swiglu_contiguous_float32",       # host name in the .metal file
     "kind": "threads" | "threadgroups",          # dispatch_threads / dispatch_threadgroups
     "grid": (x, y, z),                           # threads, or threadgroups
     "threads_per_threadgroup": (x, y, z),
     "buffers": {0: ("input", 0), 2: ("output", 0), 3: ("bytes", b"...")},
     "buffer_offsets": {0: 64},                   # byte offset of a bound array, when not 0
     "threadgroup_memory": {0: 4096},
     "input_memory": {0: b"..."}}                 # each bound input's buffer, from its start

`run_plan` executes those commands on the `.metal` source with `metalsim`, so Linux checks the
kernel *and* the host code that launches it, exactly as eval_gpu would launch it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

BFLOAT16 = "bfloat16"  # stored as np.uint16 bit patterns, as metalsim expects

Shape = tuple[int, ...]


def storage_dtype(dtype) -> np.dtype:
    """The NumPy dtype that holds a buffer of `dtype` ("bfloat16" -> uint16 bits)."""
    if isinstance(dtype, str) and dtype == BFLOAT16:
        return np.dtype(np.uint16)
    return np.dtype(dtype)


def harness_binds_offsets() -> bool:
    """Whether metalsim can bind a buffer at a byte offset (`dispatch(..., buffer_offsets=)`).

    Metal binds every MLX array at its offset into its buffer, and a view with negative strides
    (`x[::-1]`) then reads *before* that offset. Without harness support, run_plan binds the
    memory from the offset on, which is right for views whose strides are all >= 0.
    """
    import metalsim

    return "buffer_offsets" in inspect.signature(metalsim.Library.dispatch).parameters


def run_plan(
    metal_path: str | Path,
    plan: Sequence[Mapping],
    inputs: Sequence[np.ndarray] | None,
    output_shapes_dtypes: Sequence[tuple[Shape, object]],
    *,
    defines: Mapping[str, object] | None = None,
    include_dirs: Sequence[str | Path] = (),
) -> list[np.ndarray]:
    """Run `plan` (from an extension's `_plan_<op>`) on the kernels in `metal_path`.

    inputs[k] is the memory the op's k-th input lives in, as the plan describes it: for a
    contiguous array, just its values (bfloat16 as uint16 bits); for a view (transposed, sliced,
    broadcast), the array it is a view of, since the plan carries the view's strides and byte
    offset. With inputs=None the memory recorded in the plan is used (what eval_gpu would bind),
    so nothing about MLX's memory layout has to be guessed. output_shapes_dtypes[k] is (shape,
    dtype) of the k-th output, dtype a NumPy dtype or "bfloat16". Outputs start filled with 0xFF
    bytes, a NaN in every float format, so an element no thread writes shows up. Returns the
    outputs (bfloat16 as uint16 bits).
    """
    import metalsim

    lib = metalsim.compile(
        str(metal_path),
        defines=dict(defines) if defines else None,
        include_dirs=tuple(include_dirs),
    )
    outputs = []
    for shape, dtype in output_shapes_dtypes:
        out = np.empty(tuple(shape), dtype=storage_dtype(dtype))
        out.view(np.uint8)[...] = 0xFF
        outputs.append(out)
    given = None if inputs is None else [np.ascontiguousarray(x) for x in inputs]
    native_offsets = harness_binds_offsets()

    for n, cmd in enumerate(plan):
        buffers: dict[int, np.ndarray | bytes] = {}
        offsets: dict[int, int] = {}
        for index, (kind, value) in cmd["buffers"].items():
            if kind == "bytes":
                buffers[index] = bytes(value)
                continue
            if kind == "input" and given is None:
                memory = np.frombuffer(cmd["input_memory"][value], dtype=np.uint8)
            elif kind == "input":
                memory = _pick(given, value, "input", cmd, n)
            elif kind == "output":
                memory = _pick(outputs, value, "output", cmd, n)
            else:
                raise ValueError(f"plan command {n} ({cmd['kernel']}): unknown binding {kind!r}")
            offset = cmd.get("buffer_offsets", {}).get(index, 0)
            if offset and native_offsets:
                buffers[index], offsets[index] = memory, offset
            else:
                buffers[index] = _at_offset(memory, offset, cmd, n)
        kwargs = dict(
            threads_per_threadgroup=tuple(cmd["threads_per_threadgroup"]),
            buffers=buffers,
            threadgroup_memory=dict(cmd.get("threadgroup_memory", {})),
        )
        if offsets:
            kwargs["buffer_offsets"] = offsets
        if cmd["kind"] == "threads":
            lib.dispatch_threads(cmd["kernel"], threads=tuple(cmd["grid"]), **kwargs)
        elif cmd["kind"] == "threadgroups":
            lib.dispatch(cmd["kernel"], grid=tuple(cmd["grid"]), **kwargs)
        else:
            raise ValueError(f"plan command {n} ({cmd['kernel']}): unknown kind {cmd['kind']!r}")
    return outputs


def _pick(arrays: Sequence[np.ndarray], k: int, what: str, cmd: Mapping, n: int) -> np.ndarray:
    if not 0 <= k < len(arrays):
        raise ValueError(
            f"plan command {n} ({cmd['kernel']}) binds {what} {k}, but run_plan got {len(arrays)} {what}s"
        )
    return arrays[k]


def _at_offset(a: np.ndarray, offset: int, cmd: Mapping, n: int) -> np.ndarray:
    """The buffer from byte `offset` on, as the GPU sees a buffer bound with an offset."""
    if offset == 0:
        return a
    if not 0 < offset < a.nbytes:
        raise ValueError(
            f"plan command {n} ({cmd['kernel']}): offset {offset} outside a {a.nbytes}-byte buffer"
        )
    return a.reshape(-1).view(np.uint8)[offset:]


def buffer_of(x) -> np.ndarray:
    """An mx.array's values in row-major order as a NumPy buffer (bfloat16 as uint16 bits)."""
    import mlx.core as mx

    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16))
    return np.array(x)


def values_of(buffer: np.ndarray, dtype) -> np.ndarray:
    """A buffer read back as float64 (bfloat16 bits decoded)."""
    if isinstance(dtype, str) and dtype == BFLOAT16:
        import metalsim

        return np.asarray(metalsim.bf16_to_f32(buffer), dtype=np.float64)
    return buffer.astype(np.float64)
