"""Peak memory of one client step three ways, on the same model and batch, in the same run.

1. inference: one forward pass without autograd (the floor any method pays);
2. zo:        one FedKSeed step (``fedopt.zo``): two forward passes at w ± εz with
              in-place, module-by-module perturbations, then w ← w − η ĝ z;
3. backprop:  one first-order step (forward, backward, optimizer step), as the
              ``sgd`` client takes it.

Memory is counted tensor by tensor with PyTorch's ``MemTracker`` (CPU or CUDA):
the model's parameters plus everything allocated during the step (activations,
gradients, optimizer state, temporaries), at its highest point. Each step runs
once untracked first. The result is the ratios, measured in the same process.

Usage: python bench/zo_memory.py [--model transformer --arch llama --size small]
       [--seq-len 128 --batch 1] [--optimizer adam]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch
from torch import nn

from fedopt import zo
from fedopt.data.core import TextSpec
from fedopt.training import objective

MB = 2**20


def build(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model and one batch (token ids and next-token labels, or features and labels)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if args.model == "mlp":
        model = nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, 10))
        return model, torch.randn(args.batch, 64, generator=g), torch.randint(10, (args.batch,))
    from fedopt.text.models import transformer

    spec = TextSpec(kind="lm", vocab_size=260, pad_id=0)
    model = transformer((args.seq_len,), 260, arch=args.arch, size=args.size, text=spec)
    ids = torch.randint(1, 260, (args.batch, args.seq_len), generator=g)
    return model, ids, torch.roll(ids, -1, dims=1)


def peak_bytes(
    model: nn.Module, step: Callable[[zo.PeakMemory], None], optimizer: torch.optim.Optimizer
) -> dict[str, int]:
    """Peak tracked bytes of ``step`` (parameters and optimizer state included), by kind."""
    step(zo.PeakMemory())  # lazy allocations (workspaces, optimizer state) happen once
    with zo.PeakMemory(model, optimizer) as meter:
        step(meter)
    if meter.peak_bytes is None:
        raise SystemExit("this torch build has no MemTracker (torch.distributed._tools)")
    return meter.by_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["transformer", "mlp"], default="transformer")
    parser.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--size", choices=["tiny", "small", "base"], default="small")
    parser.add_argument("--width", type=int, default=4096, help="mlp hidden width")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    model, x, y = build(args)
    model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_cls(params, lr=1e-4)
    noise = zo.Noise(model, device="cpu")
    pert = zo.Perturbation(model, noise)
    seed = iter(range(1, 10**9))

    def inference(meter: zo.PeakMemory) -> None:
        meter.forward_starts()
        with torch.no_grad():
            objective(model(x), y)

    def zo_step(meter: zo.PeakMemory) -> None:
        s = next(seed)

        def loss() -> torch.Tensor:
            meter.forward_starts()
            return objective(model(x), y)[0]

        with pert.hooked():
            lp, lm = pert.two_point(loss, seed=s, eps=5e-4)
        noise.step_(s, zo.projected_gradient(lp, lm, 5e-4), lr=1e-6)

    def backprop(meter: zo.PeakMemory) -> None:
        meter.forward_starts()
        optimizer.zero_grad(set_to_none=True)
        objective(model(x), y)[0].backward()
        optimizer.step()

    steps = {"inference": inference, "zo": zo_step, "backprop": backprop}
    peaks = {name: peak_bytes(model, step, optimizer) for name, step in steps.items()}
    n = sum(p.numel() for p in params)
    what = args.model if args.model == "mlp" else f"{args.arch}-{args.size}"
    print(
        f"model {what}: {n / 1e6:.2f}M parameters ({n * 4 / MB:.1f} MiB fp32), "
        f"batch {tuple(x.shape)}, {args.optimizer}, {args.device}"
    )
    kinds = ["Parameter", "Activation", "Gradient", "Optstate", "Temp", "Other"]
    print(f"{'step':<10} {'peak MiB':>9} " + " ".join(f"{k[:10]:>10}" for k in kinds))
    for name, peak in peaks.items():
        cells = " ".join(f"{peak.get(k, 0) / MB:>10.2f}" for k in kinds)
        print(f"{name:<10} {peak['Total'] / MB:>9.2f} {cells}")
    base = peaks["inference"]["Total"]
    print(
        f"ratios: zo / inference = {peaks['zo']['Total'] / base:.2f}, "
        f"backprop / inference = {peaks['backprop']['Total'] / base:.2f}, "
        f"backprop / zo = {peaks['backprop']['Total'] / peaks['zo']['Total']:.2f}"
    )


if __name__ == "__main__":
    main()
