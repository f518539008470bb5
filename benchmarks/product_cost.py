"""Cost of one curvature-matrix product (a CG iteration) relative to one gradient.

For the CNN of table S.2b (CIFAR-10-shaped random inputs) this times

* a plain forward + backward pass (the gradient),
* one backward pass inside ``backprop(GGNMP())`` / ``HMP()`` / ``PCHMP()`` (setting up
  the products), and
* one product call per parameter block, ``p.ggnmp(V)`` with ``V`` of shape
  ``[1, *p.shape]``, summed over all blocks (what one CG iteration of
  ``NewtonCG`` costs),

and prints medians over repeats as ratios to the gradient.
Run: ``python benchmarks/product_cost.py [--batch 64] [--repeats 5] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from hbpkit import backprop, extend
from hbpkit.architectures import cnn, fcnn
from hbpkit.extensions import GGNMP, HMP, PCHMP


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["cnn", "fcnn"], default="cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = extend({"cnn": cnn, "fcnn": fcnn}[args.arch]())
    loss_fn = extend(nn.CrossEntropyLoss())
    X = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    params = list(model.parameters())

    def gradient():
        model.zero_grad()
        loss_fn(model(X), y).backward()

    base = _median_time(gradient, args.repeats)
    print(
        f"{args.arch}, batch {args.batch}, {args.threads} thread(s): gradient "
        f"(forward + backward) {1000 * base:.1f} ms"
    )
    print("| product | backward with products / gradient | one product call / gradient |")
    print("|---|---|---|")
    for ext in (GGNMP(), HMP(), PCHMP(modify="abs"), PCHMP(modify="clip")):

        def setup(ext=ext):
            model.zero_grad()
            loss = loss_fn(model(X), y)
            with backprop(ext):
                loss.backward()

        t_setup = _median_time(setup, args.repeats)
        products = [getattr(p, ext.savefield) for p in params]
        vectors = [torch.randn(1, *p.shape) for p in params]

        def one_iteration(products=products, vectors=vectors):
            for product, v in zip(products, vectors):
                product(v)

        t_product = _median_time(one_iteration, args.repeats)
        print(f"| {ext!r} | {t_setup / base:.2f} | {t_product / base:.2f} |")


if __name__ == "__main__":
    main()
