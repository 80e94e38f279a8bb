"""A small training job for trying trainstack: numpy only, a few seconds on a CPU.

Fits a linear model with mini-batch SGD. Each epoch prints one log line, appends to
results/metrics.jsonl and writes checkpoints/epoch-NNN.npz; at the end results/final.json
holds the learned weights and the final loss. A restarted run resumes from the newest
checkpoint, and SIGTERM (`invoke stop`) saves one before exiting.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

CHECKPOINTS = Path("checkpoints")
RESULTS = Path("results")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", 8)))
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch-seconds", type=float, default=0.3, help="pause per epoch, to watch the log stream")
    return parser.parse_args(argv)


def latest_checkpoint() -> Path | None:
    found = sorted(CHECKPOINTS.glob("epoch-*.npz"))
    return found[-1] if found else None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    true_w = rng.normal(size=args.features)
    x = rng.normal(size=(args.samples, args.features))
    y = x @ true_w + 0.01 * rng.normal(size=args.samples)

    CHECKPOINTS.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    w = np.zeros(args.features)
    start_epoch = 0
    resume = latest_checkpoint()
    if resume is not None:
        state = np.load(resume)
        w, start_epoch = state["w"], int(state["epoch"])
        print(f"resuming from {resume} (epoch {start_epoch})", flush=True)

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    print(f"training: {args.samples} samples, {args.features} features, {args.epochs} epochs", flush=True)
    loss = float(np.mean((x @ w - y) ** 2))
    for epoch in range(start_epoch + 1, args.epochs + 1):
        order = rng.permutation(args.samples)
        for begin in range(0, args.samples, args.batch):
            batch = order[begin:begin + args.batch]
            error = x[batch] @ w - y[batch]
            w -= args.lr * (x[batch].T @ error) / len(batch)
        loss = float(np.mean((x @ w - y) ** 2))
        np.savez(CHECKPOINTS / f"epoch-{epoch:03d}.npz", w=w, epoch=epoch)
        with open(RESULTS / "metrics.jsonl", "a") as metrics:
            metrics.write(json.dumps({"epoch": epoch, "loss": loss, "time": time.time()}) + "\n")
        print(f"epoch {epoch}/{args.epochs} loss {loss:.6f}", flush=True)
        if stopping:
            print(f"SIGTERM: checkpoint epoch {epoch} saved, exiting", flush=True)
            return 128 + signal.SIGTERM
        time.sleep(args.epoch_seconds)

    final = {"loss": loss, "weights": w.tolist(), "weight_error": float(np.max(np.abs(w - true_w)))}
    (RESULTS / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"done: final loss {loss:.6f}, max weight error {final['weight_error']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
