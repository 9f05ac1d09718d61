"""python -m mend.train: the training command of the learned editors (:mod:`mend.learned.train`)."""

from mend.cli import run
from mend.learned.train import USAGE, main

__all__ = ["USAGE", "main"]

if __name__ == "__main__":
    run(main, USAGE)
