"""Shared by every benchmark: print a markdown table and store it in docs/benchmarks.md.

Each benchmark owns one section between ``<!-- BEGIN name -->`` / ``<!-- END name -->``
markers, so benchmarks can be re-run one at a time without clobbering the others.
"""
from __future__ import annotations

import itertools
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SHARED_DATA = Path(os.environ.get("CATALENS_SHARED_DATA", ROOT.parent / "shared" / "data"))
HEADER = "# Benchmarks\n\nProduced by the scripts in `benchmarks/` (each writes its own section).\n"


def log(msg: str) -> None:
    """A progress line with the time of day (the benchmarks' own log, beside their tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats get 3 significant decimals."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    """The GPU if any, CPU model, the instruction sets that decide the fast paths, cores, Python."""
    from catalens.embed.runtimes import cpu_flags, cpu_model

    flags = cpu_flags()
    isa = [name for name, flag in (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16"),
                                   ("VNNI", "avx512_vnni"), ("AVX2", "avx2")) if flag in flags]
    gpu = ""
    import torch

    if torch.cuda.is_available():  # benchmarks run there use it (runtime auto, fine-tuning)
        gpu = f"{torch.cuda.get_device_name()} (torch {torch.__version__}) + "
    return (f"{gpu}{cpu_model()} ({', '.join(isa[:4]) or platform.machine()}), {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}")


def cpu_kind() -> tuple[str, str]:
    """``("", "")`` on a CPU with AVX-512, else a section-name suffix and a title note (``"_avx2"``, ``" (AVX2-only
    CPU)"``): a benchmark whose numbers depend on the instruction sets keeps one section per kind of CPU."""
    from catalens.embed.runtimes import cpu_flags

    return ("", "") if "avx512f" in cpu_flags() else ("_avx2", " (AVX2-only CPU)")


def write_section(name: str, title: str, body: str, command: str | None = None) -> None:
    """Replace (or append) section ``name`` of docs/benchmarks.md and print it; ``command`` is the
    command line that produced it (default ``python benchmarks/NAME.py``)."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = command or f"python benchmarks/{name}.py"
    section = f"<!-- BEGIN {name} -->\n## {title}\n\n_Run {stamp} on {machine()}; `{command}`._\n\n{body.strip()}\n<!-- END {name} -->"
    print(section)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


def publish(name: str, title: str, body: str, write: bool = True, command: str | None = None) -> None:
    """Write section ``name`` of docs/benchmarks.md (and print it), or only print ``body``."""
    if write:
        write_section(name, title, body, command)
    else:
        print(body)


def choose_weights(probs: dict, y) -> tuple[dict[str, int], float]:
    """Ensemble weights 0-3 per member (two members at least) with the best accuracy of the
    weighted mean of ``probs`` (``{member: (n, C)}``) on labels ``y`` (``-1`` = unlabelled),
    ties broken by log-loss; ``({member: weight} without the zeros, that accuracy)``. Used on val
    only, never on test."""
    import numpy as np

    names, best = list(probs), None
    keep = np.asarray(y) >= 0
    yk = np.asarray(y)[keep]
    for w in itertools.product(range(4), repeat=len(names)):
        if sum(1 for x in w if x) < 2:
            continue
        p = sum(wi * probs[n] for wi, n in zip(w, names))[keep] / sum(w)
        acc = float((p.argmax(1) == yk).mean())
        nll = float(-np.log(np.clip(p[np.arange(len(yk)), yk], 1e-9, 1)).mean())
        if best is None or (acc, -nll) > best[0]:
            best = ((acc, -nll), w)
    return {n: wi for n, wi in zip(names, best[1]) if wi}, best[0][0]


def cached_cv_args(doc: str, work: Path, results: Path, flag: str, choices: list[str]):
    """The command line of a resumable CV benchmark that may read ``bench_presets``' embedding caches:
    ``--<flag>`` one or more of ``choices`` (default all), ``--presets-cache``, ``--fresh`` (forgets ``work``:
    results and the benchmark's own cache). Returns ``(args, results so far, the command as run)``."""
    import argparse
    import json
    import shutil

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument(f"--{flag}", nargs="+", choices=choices, default=list(choices))
    ap.add_argument("--presets-cache", action="store_true", help="read the features from bench_presets' caches")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results (and this benchmark's own cache)")
    args = ap.parse_args()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    res = json.loads(results.read_text()) if results.exists() else {}
    chosen = getattr(args, flag)
    command = f"python benchmarks/{Path(sys.argv[0]).name}" + (f" --{flag} {' '.join(chosen)}"
                                                               if chosen != list(choices) else "")
    return args, res, command + (" --presets-cache" if args.presets_cache else "")
