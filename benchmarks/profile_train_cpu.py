"""Where the float32 DiTDH train step spends its time on CPU, ours against PyTorch's.

Why: on the same cores the XLA:CPU step is not faster than the PyTorch reference
(`bench train --vs-torch`); this says which operations take the time. Ours: the
production step (`bench`'s Trainer program, one CPU device) traced with
`jax.profiler` (XLA:CPU records one event per executed HLO instruction with
`--xla_cpu_enable_xprof_traceme`), each instruction classified from the compiled HLO
(matmul, attention softmax, layout copies / transposes, other fusions, ...). Torch: the
same step of `benchmarks/torch_ditdh.py` under `torch.profiler`, by aten operator.
Both on the same threads (XLA:CPU's pool size, see `bench_torch.xla_cpu_threads`).

    python -m benchmarks.profile_train_cpu --size S --batch 4 [--steps 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mmfm_jax import bench, bench_torch, parallel  # noqa: E402
from mmfm_jax import train as train_lib  # noqa: E402
from mmfm_jax.files import write_json  # noqa: E402

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\(")
CONTAINERS = ("while", "call", "conditional")  # their events contain their bodies' events
CALLS = re.compile(r"calls=%?([\w.\-]+)")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def hlo_index(text: str) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(instruction -> opcode, instruction -> called computation, computation -> opcodes)
    of a compiled module's HLO text."""
    opcode, calls, ops = {}, {}, collections.defaultdict(set)
    current = None
    for line in text.splitlines():
        m = COMPUTATION.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            continue
        m = INSTRUCTION.match(line)
        if m:
            opcode[m.group(1)] = m.group(2)
            if current:
                ops[current].add(m.group(2))
            c = CALLS.search(line)
            if c:
                calls[m.group(1)] = c.group(1)
    return opcode, calls, ops


def category(name: str, opcode: dict, calls: dict, ops: dict) -> str:
    """What one executed instruction is: matmul, softmax, layout, reduction, elementwise."""
    op = opcode.get(name, "")
    inner = ops.get(calls.get(name, ""), set())
    if op in ("dot", "convolution") or "dot" in inner or name.startswith("ynn_"):
        return "matmul"
    if op == "custom-call" and name.startswith(("onednn", "__onednn")):
        return "matmul"
    if "exponential" in inner and "reduce" in inner:
        return "softmax (exp + reduce)"
    if op in ("transpose", "copy") or (inner and inner <= {"transpose", "copy", "bitcast",
                                                           "parameter", "reshape"}):
        return "layout (transpose / copy)"
    if op == "reduce" or "reduce" in inner:
        return "reduction fusion"
    if op in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute"):
        return "collective"
    if op == "fusion" or inner:
        return "elementwise fusion"
    return f"other ({op or 'runtime'})"


def trace_ours(args) -> dict:
    """Seconds per step and per-category time of our step from a jax.profiler trace."""
    cfg = bench.run_config(args, args.batch)
    mesh = parallel.make_mesh(dict(cfg.mesh))
    trainer = train_lib.Trainer.create(cfg, "", mesh)
    program = bench._TrainProgram(trainer, args.batch, donate=True)
    compiled, state = program.compiled, trainer.init()
    rng = np.random.default_rng(0)
    data = parallel.host_to_global(
        {k: rng.standard_normal(v.shape, np.float32) for k, v in
         program.batch_abstract.items()}, mesh)
    state, _ = compiled(state, trainer.encoder_state, trainer.mixtures, data)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(args.steps):
                state, _ = compiled(state, trainer.encoder_state, trainer.mixtures, data)
            jax.block_until_ready(state)
        seconds = (time.perf_counter() - t) / args.steps
        (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    opcode, calls, ops = hlo_index(compiled.as_text())
    per_op, eigen_threads = collections.Counter(), set()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name:
                eigen_threads.add(line.name)
            if "PjRtCpuClient" not in line.name and "XLAEigen" not in line.name:
                continue  # thunks run on the client thread and on the Eigen pool
            for e in line.events:
                if e.name in opcode and opcode[e.name] not in CONTAINERS:
                    per_op[e.name] += e.duration_ns / 1e9 / args.steps
    by_cat = collections.Counter()
    for name, s in per_op.items():
        by_cat[category(name, opcode, calls, ops)] += s
    return {"seconds_per_step": seconds, "op_seconds_per_step": sum(per_op.values()),
            "categories": dict(by_cat.most_common()),
            "top_ops": [(n, s, category(n, opcode, calls, ops))
                        for n, s in per_op.most_common(args.top)],
            "xla_eigen_threads_seen": len(eigen_threads)}


def trace_torch(args) -> dict:
    """Seconds per step and per-operator time of the PyTorch reference's step."""
    import torch

    torch.set_num_threads(bench_torch.reference_threads(args))
    mcfg = train_lib.model_config(bench.run_config(args, args.batch))
    step = bench_torch.torch_train_step(mcfg, args.batch, torch.device("cpu"))
    step()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - t) / args.steps
    rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)
    return {"seconds_per_step": seconds, "threads": torch.get_num_threads(),
            "top_ops": [(r.key, r.self_cpu_time_total / 1e6 / args.steps, r.count // args.steps)
                        for r in rows[:args.top]]}


# (M, K, N, transpose lhs) of the S step's largest products at batch 4 (1024 tokens): the
# head's per-token adaLN, SwiGLU in / out and qkv, and a weight gradient X^T dY.
MATMUL_SHAPES = ((1024, 2048, 12288, False), (1024, 2048, 10922, False),
                 (1024, 5461, 2048, False), (1024, 2048, 6144, False),
                 (2048, 1024, 12288, True))


def matmul_pairs(threads: int, repeats: int = 5) -> list[dict]:
    """Seconds of one float32 product, XLA:CPU against torch on `threads` threads,
    interleaved call by call (medians), so that a shared machine's load hits both alike."""
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    rows = []
    for m, k, n, transpose in MATMUL_SHAPES:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((k, m) if transpose else (m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        ours = jax.jit(lambda x, y, t=transpose: jnp.dot(x.T if t else x, y,
                                                         precision="highest"))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        lhs = ta.T if transpose else ta
        ours(ja, jb).block_until_ready()
        torch.mm(lhs, tb)
        times = {"ours": [], "torch": []}
        for _ in range(repeats):
            t = time.perf_counter()
            ours(ja, jb).block_until_ready()
            times["ours"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.mm(lhs, tb)
            times["torch"].append(time.perf_counter() - t)
        med = {key: float(np.median(v)) for key, v in times.items()}
        rows.append({"shape": (m, k, n), "transposed_lhs": transpose, **med,
                     "gflops_ours": 2 * m * k * n / med["ours"] / 1e9,
                     "gflops_torch": 2 * m * k * n / med["torch"] / 1e9})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--size", default="S", choices=sorted(bench.SIZES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--input-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2, help="traced steps")
    p.add_argument("--top", type=int, default=12, help="operations listed")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--matmuls-only", action="store_true",
                   help="only the interleaved matmul comparison (seconds, not minutes)")
    args = p.parse_args(argv)
    args.dtype, args.attention, args.fsdp, args.remat, args.scan = (
        "float32", None, 1, None, None)
    if args.matmuls_only:
        rows = matmul_pairs(bench_torch.reference_threads(args))
        for m in rows:
            print(m)
        return {"matmuls": rows}
    result = {"command": "python -m benchmarks.profile_train_cpu " + " ".join(
        sys.argv[1:] if argv is None else argv), "xla_threads": bench_torch.xla_cpu_threads(),
        "matmuls": matmul_pairs(bench_torch.reference_threads(args)),
        "torch": trace_torch(args), "ours": trace_ours(args)}
    print(format_profile(result))
    if args.json:
        write_json(args.json, result, indent=2)
    return result


def format_profile(r: dict) -> str:
    ours, ref = r["ours"], r["torch"]
    lines = [f"threads: XLA {r['xla_threads']} (Eigen threads seen in the trace "
             f"{ours['xla_eigen_threads_seen']}), torch {ref['threads']}",
             f"ours {ours['seconds_per_step']:.2f} s/step (per-op time summed "
             f"{ours['op_seconds_per_step']:.2f} s), torch {ref['seconds_per_step']:.2f} s/step",
             "ours by category (s/step, share of op time):"]
    total = ours["op_seconds_per_step"] or 1.0
    for name, s in ours["categories"].items():
        lines.append(f"  {name:<28}{s:8.3f}  {s / total:6.1%}")
    lines.append("ours, top instructions:")
    lines += [f"  {n:<40}{s:8.3f}  {c}" for n, s, c in ours["top_ops"]]
    lines.append("float32 products, interleaved medians (GFLOP/s ours / torch):")
    lines += [f"  {'x'.join(map(str, m['shape']))}{' (lhs^T)' if m['transposed_lhs'] else ''}"
              f": {m['gflops_ours']:.0f} / {m['gflops_torch']:.0f}" for m in r["matmuls"]]
    lines.append("torch, top operators (self time s/step, calls/step):")
    lines += [f"  {n:<40}{s:8.3f}  {c}" for n, s, c in ref["top_ops"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
