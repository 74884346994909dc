"""Benchmark of the scoring pass and of the iHVP solvers, measured in one run on this machine (not a timed test).

    python benchmarks/scoring.py [--threads 1] [--rounds 5] [--batch-size 500]

Part 1 scores every pretraining example of an MLP (MNIST-shaped, 784→64→64→10, m = 2000) and of
``msif_lab.models.SmallCNN`` (CIFAR-shaped, m = 1000) in float32 against T = 1 and T = 100 random test-side vectors
with each method of :func:`msif_lab.scoring.score_dots`, and prints each time as a ratio to one plain forward pass
(no graph) and to one forward+backward pass (gradient of the summed loss with respect to every parameter) over the
same examples in the same batches. It also prints the work no method can skip: the T dot products alone take
T·p multiply-adds per example while a forward pass takes F (its layers' multiply-adds), so scoring costs at least
T·p / F forward passes' worth of arithmetic (less in time only as far as its big GEMMs outrun the forward pass).

Part 2 solves (H + λI) x = v on a small trained problem (float64) with the dense, CG and LiSSA solvers and prints
each solve's cost in HVP passes (``SolveInfo.hvp_calls`` per right-hand side) and its time in units of one HVP.

Times are CPU time of this process (``time.process_time``; with the default single thread that is the wall time
an idle machine would show), so that other processes sharing the CPU do not inflate them. Each is the minimum over
up to ``--rounds`` repeats, interleaved across methods (round-robin); one that takes over a second is taken once.
"auto" runs the method it chooses, so the two columns pool their samples (both show the minimum).
Goals (issue 2 §7): T = 1 scoring within 3× a forward pass; T = 100 within 2× a forward+backward pass.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msif_lab.curvature import ParamSpace, StageObjective, per_example_grads  # noqa: E402
from msif_lab.models import MLPEmbedding, SmallCNN, classifier  # noqa: E402
from msif_lab.scoring import choose_method, score_dots  # noqa: E402
from msif_lab.solvers import Solver  # noqa: E402
from msif_lab.stages import Stage  # noqa: E402
from msif_lab.train import fit_stage  # noqa: E402

GOAL_T1_FWD = 3.0
GOAL_T100_FB = 2.0
METHODS = ("jvp", "grad", "factored", "auto")


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the linear and convolution layers for one example."""
    total = 0

    def hook(mod, args, out):
        nonlocal total
        k = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        total += out[0].numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def timed(fns: dict, rounds: int, slow: float = 1.0) -> dict:
    """Minimum wall time of each function over up to ``rounds`` interleaved repeats (once if it takes > ``slow``)."""
    best = {k: float("inf") for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            if r and best[k] > slow:
                continue
            t = time.process_time()
            f()
            best[k] = min(best[k], time.process_time() - t)
    return best


def bench_model(name, model, X, y, *, batch_size, rounds, skip=()):
    stage = Stage(model, ce, X, y)
    params, block = stage.initial_params(), stage.trainable_names
    p = ParamSpace(params, block).size
    macs = forward_macs(model, X)
    gen = torch.Generator().manual_seed(0)
    V = {T: torch.randn(T, p, generator=gen) for T in (1, 100)}

    def fwd():
        with torch.no_grad():
            for _, xs, ys in stage.batches(batch_size):
                stage.losses(params, xs, ys)

    live = {n: t.clone().requires_grad_(True) for n, t in params.items()}

    def fwd_bwd():
        for _, xs, ys in stage.batches(batch_size):
            torch.autograd.grad(stage.losses(live, xs, ys).sum(), list(live.values()))

    fns = {"fwd": fwd, "fb": fwd_bwd}
    for T, vec in V.items():
        for m in METHODS:
            if (m, T) not in skip:
                fns[(m, T)] = (lambda vec=vec, m=m: score_dots(stage, params, block, vec, batch_size=batch_size,
                                                               method=m))
    # warm-up (first-call costs of torch.func and of the kernels), then check the methods agree on T = 100
    with torch.no_grad():
        stage.losses(params, *next(iter(stage.batches(8)))[1:])
    xs8, ys8 = tuple(t[:8] for t in stage.inputs), stage.targets[:8]
    ref = (per_example_grads(stage, params, block, xs8, ys8) @ V[100].T).T
    for m in ("jvp", "factored"):
        got = score_dots(stage, params, block, V[100], inputs=xs8, targets=ys8, method=m)
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-3, f"{name}: method {m} disagrees with per-example gradients (relative error {err:.1e})"
    t = timed(fns, rounds)
    auto = {T: choose_method(stage, block, T)[0] for T in V}
    for T, chosen in auto.items():  # auto runs the chosen method: pool the two sets of samples of one computation
        if ("auto", T) in t and (chosen, T) in t:
            t[("auto", T)] = t[(chosen, T)] = min(t[("auto", T)], t[(chosen, T)])
    return dict(name=name, p=p, m=len(y), macs=macs, t=t, auto=auto)


def print_scoring(rows):
    print("Scoring all m examples: time as a ratio to one forward pass (fwd) / one forward+backward pass (f+b)")
    print(f"{'model':<8}{'m':>6}{'p':>8}{'fwd [s]':>9}{'f+b/fwd':>8}  {'T':>4}  "
          + "".join(f"{m:>16}" for m in METHODS) + f"{'dots T·p/F':>14}")
    for r in rows:
        t, fwd, fb = r["t"], r["t"]["fwd"], r["t"]["fb"]
        for T in (1, 100):
            cells = []
            for m in METHODS:
                if (m, T) in t:
                    cells.append(f"{t[(m, T)] / fwd:7.2f} /{t[(m, T)] / fb:6.2f}")
                else:
                    cells.append(f"{'skipped':>14}")
            floor = T * r["p"] / r["macs"]
            head = (f"{r['name']:<8}{r['m']:>6}{r['p']:>8}{fwd:>9.4f}{fb / fwd:>8.2f}" if T == 1
                    else " " * 39)
            print(f"{head}  {T:>4}  " + "".join(f"{c:>16}" for c in cells) + f"{floor:>7.1f} /{floor * fwd / fb:5.1f}")
        print(" " * 39 + f"  auto chose: T=1 → {r['auto'][1]}, T=100 → {r['auto'][100]}")
    print("(each cell: ×fwd / ×f+b. dots T·p/F: the multiply-adds of the T dot products themselves, T·p per "
          "example, over the forward pass's F per example, as ×fwd / ×f+b — the work no method can skip)")
    print()
    print("Goals:")
    for r in rows:
        t = r["t"]
        one = t[("auto", 1)] / t["fwd"]
        hundred = t[("auto", 100)] / t["fb"]
        print(f"  {r['name']:<4} T=1   (auto)  {one:6.2f} × fwd  goal ≤ {GOAL_T1_FWD:g}   "
              f"{'MET' if one <= GOAL_T1_FWD else 'NOT MET'}")
        dots = 100 * r["p"] / r["macs"]
        note = ("" if dots * t["fwd"] / t["fb"] < GOAL_T100_FB else
                f"  (the 100 dot products alone are {dots:.0f} forward passes' worth of multiply-adds)")
        print(f"  {r['name']:<4} T=100 (auto)  {hundred:6.2f} × f+b  goal ≤ {GOAL_T100_FB:g}   "
              f"{'MET' if hundred <= GOAL_T100_FB else 'NOT MET'}{note}")


def bench_solvers(rounds):
    torch.manual_seed(0)
    dt = torch.float64
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 10, generator=g, dtype=dt)
    y = ((X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.5).long())
    stage = Stage(classifier(MLPEmbedding(10, width=8), 3).to(dt), ce, X, y, weight_decay=1e-2)
    fit = fit_stage(stage, stage.initial_params(), stage.trainable_names, tol=1e-9, max_iter=1000)
    obj = StageObjective(stage, fit.params, stage.trainable_names)
    Xt = torch.randn(3, 10, generator=g, dtype=dt)
    rhs = per_example_grads(stage, fit.params, stage.trainable_names, Xt, torch.tensor([0, 1, 2]))
    rhs, v = rhs[:2], rhs[0]
    hvp_time = timed({"hvp": lambda: obj.hvp(v)}, max(rounds, 10))["hvp"]
    solvers = {"dense": Solver("dense"),
               "cg": Solver("cg", options=dict(tol=1e-8)),
               "lissa": Solver("lissa", options=dict(depth=300, tol=1e-9))}
    print(f"iHVP cost on a small trained problem: MLP 10→8→3, m = {stage.n}, p = {obj.space.size}, float64, "
          f"wd = 1e-2, λ = 0, {len(rhs)} right-hand sides; one HVP pass = {hvp_time * 1e3:.2f} ms; "
          f"fit ||grad|| = {fit.grad_norm:.1e}")
    print(f"{'solver':<8}{'HVP passes / rhs':>18}{'CPU time / rhs in HVPs':>24}{'iterations':>12}"
          f"{'residual':>11}{'converged':>11}")
    for name, s in solvers.items():
        t = time.process_time()
        _, info = s.solve(obj, rhs)
        el = time.process_time() - t
        print(f"{name:<8}{info.hvp_calls / len(rhs):>18.1f}{el / len(rhs) / hvp_time:>24.1f}{info.iterations:>12}"
              f"{info.residual:>11.1e}{str(info.converged):>11}")
    print("(dense: p HVPs, vectorised, to build H once for every right-hand side, then an eigendecomposition; "
          "CG and LiSSA: sequential HVPs, plus one per right-hand side for the reported residual; "
          "LiSSA also 30 for its power-iteration scale)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved repeats per measurement (minimum taken)")
    ap.add_argument("--batch-size", type=int, default=500, help="examples per pass, for every method and baseline")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    start, cpu = time.perf_counter(), time.process_time()
    print(f"msif-lab scoring benchmark, {datetime.date.today().isoformat()}, {platform.machine()} "
          f"({platform.processor() or 'cpu'}), {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), float32, batch size {args.batch_size}, CPU time")
    print()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    rows = [
        bench_model("MLP", classifier(MLPEmbedding(784, width=64, depth=2), 10),
                    torch.randn(2000, 1, 28, 28, generator=g), torch.randint(0, 10, (2000,), generator=g),
                    batch_size=args.batch_size, rounds=args.rounds, skip={("grad", 1)}),
        bench_model("CNN", classifier(SmallCNN(3, image_size=32), 10),
                    torch.randn(1000, 3, 32, 32, generator=g), torch.randint(0, 10, (1000,), generator=g),
                    batch_size=args.batch_size, rounds=args.rounds, skip={("jvp", 100)}),
    ]
    print_scoring(rows)
    print("  (skipped: MLP grad at T = 1 costs what it costs at T = 100, the per-example gradients being the same; "
          "CNN jvp at T = 100 costs about T times its T = 1 time)")
    print()
    bench_solvers(args.rounds)
    print()
    print(f"total benchmark time {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
