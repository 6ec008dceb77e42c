"""Is sparse inference actually faster on this CPU? Dense matmul against CSR matmul at rising sparsity.

For a Linear layer's weight (``--rows`` x ``--cols``) magnitude-pruned to each sparsity, one batch of activations is
multiplied by the dense weight (``F.linear``, what a masked network runs) and by the same weight in CSR
(``torch.sparse.mm``, what a sparse export could run), timed round-robin in one run (``bench/latency.py``'s timer) so
machine noise hits both alike. The speed-up is the median of the per-repeat ratios dense / CSR: above 1 the CSR
kernel wins. Results are printed and written to ``bench/results/sparse_inference.md``; they are reported as
measured, whichever way they fall.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.latency import time_round_robin  # noqa: E402
from compressors.masks import l1_mask  # noqa: E402
from graph.serialization.atomic import atomic_path  # noqa: E402

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


def measure(rows: int, cols: int, batch: int, sparsity: float, repeats: int) -> dict[str, float]:
    """Median seconds of the dense and the CSR product, and the median per-repeat speed-up."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator)
    weight = weight * l1_mask(weight, sparsity)
    csr = weight.to_sparse_csr()
    x = torch.randn(batch, cols, generator=generator)
    xt = x.t().contiguous()
    torch.testing.assert_close(torch.sparse.mm(csr, xt).t(), F.linear(x, weight), rtol=1e-4, atol=1e-3)
    runners = {"dense": lambda: F.linear(x, weight), "csr": lambda: torch.sparse.mm(csr, xt)}
    with tqdm(total=repeats, desc=f"{rows}x{cols} b{batch} s{sparsity}", leave=False) as progress:
        samples = time_round_robin(runners, repeats, 0.05, time.perf_counter, progress)
    return {"dense": statistics.median(samples["dense"]), "csr": statistics.median(samples["csr"]),
            "speedup": statistics.median(d / c for d, c in zip(samples["dense"], samples["csr"]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "sparse_inference.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"# Dense vs CSR matmul on CPU ({args.rows}x{args.cols} weight, {args.threads} thread(s))", "",
             f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"`python bench/sparse_inference.py` (round-robin timing, median of {args.repeats})", "",
             "| batch | sparsity | dense (us) | CSR (us) | dense / CSR |", "|---:|---:|---:|---:|---:|"]
    for batch in args.batches:
        for sparsity in SPARSITIES:
            row = measure(args.rows, args.cols, batch, sparsity, args.repeats)
            lines.append(f"| {batch} | {sparsity:.2f} | {row['dense'] * 1e6:.1f} | {row['csr'] * 1e6:.1f} | "
                         f"{row['speedup']:.2f} |")
            print(lines[-1])
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with atomic_path(args.out) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
