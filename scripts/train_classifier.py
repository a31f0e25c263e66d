"""Train the digits classifier behind minidiff's Frechet distance and write data/digits_classifier.npz.

    python scripts/train_classifier.py [--epochs 20] [--out data/digits_classifier.npz]

Trains on the train split of `load_dataset("digits", seed=0)` only, then reports the accuracy on the held-out split
(the same split `quality.digits_fd` compares samples against) and stores it in the weights file's meta record.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from minidiff.instruments.classifier import train_digits_classifier
from minidiff.datasets import load_dataset

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "digits_classifier.npz"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    ds = load_dataset("digits", seed=0)
    start = time.perf_counter()
    clf = train_digits_classifier(ds.train, ds.train_labels, epochs=args.epochs, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed,
                                  log=lambda e, loss, s: print(f"epoch {e:3d}  loss {loss:.4f}  {s:6.1f} s"))
    seconds = time.perf_counter() - start
    train_acc = clf.accuracy(ds.train, ds.train_labels)
    test_acc = clf.accuracy(ds.test, ds.test_labels)
    print(f"train accuracy {train_acc:.4f} ({len(ds.train)} images), "
          f"held-out accuracy {test_acc:.4f} ({len(ds.test)} images), {seconds:.1f} s")
    clf.save(args.out, test_accuracy=test_acc, train_accuracy=train_acc, num_train=len(ds.train),
             num_test=len(ds.test), dataset="digits", dataset_seed=0, epochs=args.epochs, batch_size=args.batch_size,
             lr=args.lr, optimizer="adam", train_seconds=round(seconds, 1), machine=platform.machine(),
             command=" ".join(["python scripts/train_classifier.py", *(sys.argv[1:] if argv is None else argv)]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
