"""Mutation testing of the core modules: how many small plausible bugs does the fast test suite catch?

Each mutant is one edit of one module's AST (a flipped comparison, ``+`` <-> ``-``, ``*`` <-> ``/``, a constant off by
one, ``and`` <-> ``or``, a dropped statement, two call arguments swapped, ``True`` <-> ``False``). The mutated source is
written into a scratch copy of ``src/``, and the test files that exercise that module run against it with ``-x`` under
a per-mutant timeout (the tests marked ``slow`` are left out unless ``--with-slow``). A mutant is *killed* when the
tests fail (or time out), *survived* when they pass. Not in CI:
it is CPU-heavy. Run it niced, sampling mutants per module::

    nice -n 15 python benchmarks/mutation.py --max-mutants 12 --seed 0 [--module masking.py ...] [--jobs 1]

Prints one line per mutant and the kill rate per module and overall; ``--json PATH`` writes every result, and
``--rerun PATH`` runs only the survivors of such a file again (after adding tests; the sources must be unchanged).
The sample is one shuffle per (seed, module), so ``--max-mutants 8`` extends the ``--max-mutants 4`` sample.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "beitv2"

# module (relative to src/beitv2) -> the fast test files that exercise it
TARGETS: dict[str, list[str]] = {
    # backbone: drop path, layer scale, checkpointing (test_backbone.py); blocks limited to rows (test_speed.py)
    "models/backbone.py": ["tests/test_backbone.py", "tests/test_references.py", "tests/test_speed.py"],
    "models/mim.py": ["tests/test_models.py", "tests/test_references.py", "tests/test_task_references.py"],
    "models/vqkd.py": ["tests/test_models.py", "tests/test_references.py", "tests/test_task_references.py"],
    # quantizer: the EMA update and the dead-code restart are in test_quantizer.py and test_codebook_usage.py
    "models/quantizer.py": ["tests/test_quantizer.py", "tests/test_codebook_usage.py", "tests/test_models.py",
                            "tests/test_task_references.py"],
    "models/relpos.py": ["tests/test_references.py", "tests/test_interop.py"],
    "masking.py": ["tests/test_masking.py"],
    "tasks.py": ["tests/test_references.py", "tests/test_task_references.py", "tests/test_targets.py",
                 "tests/test_tokenizer_eval_ranks.py", "tests/test_ablations.py"],
    "mim_targets.py": ["tests/test_task_references.py", "tests/test_targets.py", "tests/test_models.py",
                       "tests/test_ablations.py"],
    "engine/optim.py": ["tests/test_optim_effective.py", "tests/test_engine.py"],
    "engine/schedule.py": ["tests/test_optim_effective.py", "tests/test_engine.py"],
    # second round: segmentation, teachers, codebook EMA / restart, interop exports
    "models/segmenter.py": ["tests/test_segmentation.py", "tests/test_seg_interop.py"],
    "data/segmentation.py": ["tests/test_segmentation.py"],
    "data/segmentation_transforms.py": ["tests/test_segmentation.py"],
    "eval/segmentation.py": ["tests/test_seg_metrics.py", "tests/test_segmentation.py"],
    "teachers/base.py": ["tests/test_teachers.py"],
    "teachers/build.py": ["tests/test_teachers.py", "tests/test_user_errors.py"],
    "interop/timm_export.py": ["tests/test_interop.py", "tests/test_hub_export.py"],
    "interop/hf_export.py": ["tests/test_interop.py", "tests/test_hub_export.py"],
    "interop/hf_segmentation.py": ["tests/test_seg_interop.py", "tests/test_segmentation.py"],
}

CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
            ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}


class Site:
    """One mutation: the index of the node (in `ast.walk` order), what to do, and a description."""

    def __init__(self, index: int, kind: str, line: int, desc: str):
        self.index, self.kind, self.line, self.desc = index, kind, line, desc


def _is_docstring(node: ast.AST, parent: ast.AST | None) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def find_sites(tree: ast.Module) -> list[Site]:
    sites: list[Site] = []
    for i, node in enumerate(ast.walk(tree)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare) and type(node.ops[0]) in CMP_SWAP:
            op = type(node.ops[0])
            sites.append(Site(i, "cmp", line, f"{op.__name__} -> {CMP_SWAP[op].__name__}"))
        elif isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAP:
            sites.append(Site(i, "binop", line, f"{type(node.op).__name__} -> {BIN_SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.AugAssign) and type(node.op) in BIN_SWAP:
            sites.append(Site(i, "binop", line, f"{type(node.op).__name__}= -> {BIN_SWAP[type(node.op)].__name__}="))
        elif isinstance(node, ast.BoolOp):
            other = "Or" if isinstance(node.op, ast.And) else "And"
            sites.append(Site(i, "boolop", line, f"{type(node.op).__name__} -> {other}"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            sites.append(Site(i, "const", line, f"{node.value!r} -> {node.value!r} + 1"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            sites.append(Site(i, "bool", line, f"{node.value} -> {not node.value}"))
        elif (isinstance(node, ast.Call) and len(node.args) >= 2
              and not any(isinstance(a, ast.Starred) for a in node.args)):
            sites.append(Site(i, "swapargs", line, "swap the first two arguments"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sites.append(Site(i, "neg", line, "drop unary minus"))
    # statements inside function bodies (not docstrings, not the only statement)
    for i, node in enumerate(ast.walk(tree)):
        if isinstance(node, (ast.FunctionDef, ast.For, ast.If, ast.With)):
            body = [s for s in node.body if not _is_docstring(s, node)]
            if len(body) >= 2:
                for s in body:
                    if isinstance(s, (ast.Assign, ast.AugAssign, ast.Expr)):
                        sites.append(Site(i, f"drop:{node.body.index(s)}", s.lineno, "drop the statement"))
    return sites


def apply(tree: ast.Module, site: Site) -> ast.Module:
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[site.index]
    if site.kind == "cmp":
        node.ops[0] = CMP_SWAP[type(node.ops[0])]()
    elif site.kind == "binop":
        node.op = BIN_SWAP[type(node.op)]()
    elif site.kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif site.kind == "const":
        node.value = node.value + 1
    elif site.kind == "bool":
        node.value = not node.value
    elif site.kind == "swapargs":
        node.args[0], node.args[1] = node.args[1], node.args[0]
    elif site.kind == "neg":
        parent = next(p for p in ast.walk(tree) for f, v in ast.iter_fields(p)
                      if v is node or (isinstance(v, list) and any(x is node for x in v)))
        for f, v in ast.iter_fields(parent):
            if v is node:
                setattr(parent, f, node.operand)
            elif isinstance(v, list):
                for k, x in enumerate(v):
                    if x is node:
                        v[k] = node.operand
    elif site.kind.startswith("drop:"):
        k = int(site.kind.split(":")[1])
        node.body[k] = ast.Pass()
    return ast.fix_missing_locations(tree)


def run_mutant(module: str, source: str, tests: list[str], timeout: float, with_slow: bool = False
               ) -> tuple[str, float]:
    work = Path(tempfile.mkdtemp(prefix="beitv2-mut-"))
    try:
        shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
        (work / "src" / "beitv2" / module).write_text(source)
        env = {**os.environ, "PYTHONPATH": str(work / "src"), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        try:
            select = [] if with_slow else ["-m", "not slow"]
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p",
                                   "no:cacheprovider", "-o", "addopts=", *select, *tests], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            status = "survived" if proc.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            status = "killed (timeout)"
        return status, time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", help="module(s) under src/beitv2 (default: all targets)")
    ap.add_argument("--max-mutants", type=int, default=12, help="mutants sampled per module (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--with-slow", action="store_true",
                    help="also run the tests marked slow (multi-process, end to end), left out by default")
    ap.add_argument("--json", type=Path, default=None, help="write every mutant's result here")
    ap.add_argument("--rerun", type=Path, default=None,
                    help="only the survivors listed in this --json file (same module, line and mutation)")
    args = ap.parse_args()
    wanted = None
    if args.rerun:
        wanted = {(r["module"], r["line"], r["mutation"]) for r in json.loads(args.rerun.read_text())
                  if r["status"] == "survived"}
    modules = args.module or list(TARGETS)
    if wanted is not None:
        modules = [m for m in modules if any(w[0] == m for w in wanted)]
    jobs = []
    for module in modules:
        src = (PKG / module).read_text()
        tree = ast.parse(src)
        sites = find_sites(tree)
        # one shuffle per (seed, module): a larger --max-mutants extends the same sample, and the modules chosen do
        # not change each other's mutants
        random.Random(f"{args.seed}:{module}").shuffle(sites)
        picked = sites[:args.max_mutants] if args.max_mutants > 0 else sites
        if wanted is not None:
            picked = [x for x in sites if (module, x.line, x.desc) in wanted]
        for site in picked:
            try:
                mutated = ast.unparse(apply(tree, site))
            except Exception as e:  # noqa: BLE001 - a mutation that cannot be written is skipped, not counted
                print(f"skip {module}:{site.line} {site.desc}: {e}")
                continue
            if mutated == ast.unparse(tree):
                continue
            jobs.append((module, site, mutated))
    print(f"{len(jobs)} mutants over {len(modules)} modules (seed {args.seed})", flush=True)
    results = []

    def one(job):
        module, site, mutated = job
        status, dt = run_mutant(module, mutated, TARGETS[module], args.timeout, args.with_slow)
        print(f"{status:17s} {dt:6.1f}s  {module}:{site.line}  {site.desc}", flush=True)
        return {"module": module, "line": site.line, "mutation": site.desc, "status": status, "seconds": round(dt, 1)}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    print("\nmodule                 killed / mutants")
    for module in modules:
        rs = [r for r in results if r["module"] == module]
        k = sum(r["status"].startswith("killed") for r in rs)
        print(f"{module:22s} {k:3d} / {len(rs):3d}")
    k = sum(r["status"].startswith("killed") for r in results)
    print(f"{'total':22s} {k:3d} / {len(results):3d}  kill rate {100 * k / max(len(results), 1):.1f}%")
    survivors = [r for r in results if r["status"] == "survived"]
    for r in survivors:
        print(f"survived: {r['module']}:{r['line']} {r['mutation']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
