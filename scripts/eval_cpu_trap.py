"""Why eval_cpu must queue its work: the same SwiGLU loop, queued and computed synchronously.

`tiny_llm_ext_ref.swiglu` queues its loop on the CPU command encoder (the right way);
`tiny_llm_ext_ref._swiglu_synchronous` runs the loop inside eval_cpu. Both are fed inputs that are
still lazy (`sin(a) * 2 + 1`, `cos(b) * 3`) and, separately, inputs that were evaluated first.
Prints how many trials give a wrong result (max error > 1e-4 against float64 NumPy).

Usage: python scripts/eval_cpu_trap.py [--trials 20] [--rows 64]
"""

import argparse
import json
import platform

import mlx.core as mx
import numpy as np

import tiny_llm_ext_ref as ext


def np_swiglu(g, u):
    g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
    return g / (1 + np.exp(-g)) * u


def slow_inputs(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """Lazy inputs on the CPU stream that take a while to compute: sin(a) * 2 + 1, cos(b) * 3."""
    with mx.stream(mx.cpu):
        return mx.sin(a) * 2 + 1, mx.cos(b) * 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--rows", type=int, default=64, help="inputs are [rows, 1024] float32")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    wrong = {"queued, lazy": 0, "synchronous, lazy": 0, "synchronous, evaluated first": 0}
    worst = dict.fromkeys(wrong, 0.0)
    for _ in range(args.trials):
        a = mx.array(rng.standard_normal((args.rows, 1024)).astype(np.float32))
        b = mx.array(rng.standard_normal((args.rows, 1024)).astype(np.float32))
        mx.eval(a, b)
        for case in wrong:
            gate, up = slow_inputs(a, b)
            if case.endswith("evaluated first"):
                mx.eval(gate, up)
            op = ext.swiglu if case.startswith("queued") else ext._swiglu_synchronous
            out = op(gate, up)
            mx.eval(out)
            err = float(
                np.nan_to_num(np.max(np.abs(np.array(out) - np_swiglu(gate, up))), nan=np.inf)
            )
            wrong[case] += err > 1e-4
            worst[case] = max(worst[case], err)
    print(
        f"{platform.machine()}, {platform.system()}, MLX {mx.__version__}, default device {mx.default_device()}"
    )
    for case, n in wrong.items():
        print(
            f"  {case:30s} wrong in {n:2d} of {args.trials} trials (worst error {worst[case]:.3g})"
        )
    print(json.dumps({"trials": args.trials, "rows": args.rows, "wrong": wrong}))


if __name__ == "__main__":
    main()
