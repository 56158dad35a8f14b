"""Local data for the example fleet: scikit-learn's digits as 3x32x32 RGB images, one .npz per device.

    python examples/own_model/make_data.py runs/own/data --devices 5

Writes `device-0.npz` ... (x uint8 [N, 3, 32, 32], y int64 [N]; a Dirichlet(0.5) split of the
labels by default) and `test.npz` (held out, for `tierfl aggregator --eval-data`). Your own data goes in
the same form: `x` of the model's input shape, integer `y`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.data import dirichlet_partition, load_digits, train_test_split


def as_rgb32(x: np.ndarray) -> np.ndarray:
    """[N, 1, 8, 8] in [0, 1] -> uint8 [N, 3, 32, 32]: each pixel 4x4, the same in every channel."""
    big = np.repeat(np.repeat(x, 4, axis=2), 4, axis=3)
    return np.repeat(np.round(big * 255).astype(np.uint8), 3, axis=1)


def main() -> None:
    """Write the device shards and the held-out set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for device-N.npz and test.npz")
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet concentration of the label split: small is skewed, large is IID (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = train_test_split(load_digits(), 0.2, args.seed)
    np.savez(args.out / "test.npz", x=as_rgb32(test.x), y=test.y)
    for i, part in enumerate(dirichlet_partition(train.y, args.devices, args.alpha, args.seed)):
        np.savez(args.out / f"device-{i}.npz", x=as_rgb32(train.x[part]), y=train.y[part])
    print(f"wrote {args.devices} device files and test.npz to {args.out}")


if __name__ == "__main__":
    main()
