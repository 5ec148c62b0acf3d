"""Write examples/data/wine_customers.csv: scikit-learn's wine data with synthetic customer PII.

The 13 wine features keep scikit-learn's names; ``cultivar`` is the label as a string; and
``customer_name`` / ``customer_email`` are made-up personal data (seeded, so every run writes
the same bytes) that the feature store must pseudonymize or drop. ``make`` does not run this:
the CSV is committed, and a test checks that this script still reproduces it byte for byte.

    python -m scripts.make_example_csv [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import random
import sys
from pathlib import Path

# by name: scikit-learn ships no type information (see trainer/sources.py)
_sklearn_datasets = importlib.import_module("sklearn.datasets")

__all__ = ["CSV_PATH", "LABEL", "PII_COLUMNS", "main", "render"]

CSV_PATH = Path(__file__).resolve().parent.parent / "examples" / "data" / "wine_customers.csv"
LABEL = "cultivar"
PII_COLUMNS = ("customer_name", "customer_email")
CULTIVARS = ("barolo", "grignolino", "barbera")  # sklearn classes 0, 1, 2
SEED = 20240611

_FIRST = (
    "Alessandra", "Bruno", "Chiara", "Davide", "Elena", "Francesco", "Giulia", "Luca",
    "Marta", "Nicola", "Paola", "Riccardo", "Sara", "Tommaso", "Valentina", "Matteo",
)  # fmt: skip
_LAST = (
    "Bianchi", "Colombo", "Conti", "Esposito", "Ferrari", "Galli", "Greco", "Lombardi",
    "Marino", "Moretti", "Ricci", "Romano", "Rossi", "Russo", "Bruno", "Costa",
)  # fmt: skip


def render() -> str:
    """The CSV text: header, then one row per wine sample in scikit-learn's order."""
    wine = _sklearn_datasets.load_wine()
    rng = random.Random(SEED)  # noqa: S311 - synthetic names, not secrets
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*PII_COLUMNS, *wine.feature_names, LABEL])
    for i, (features, target) in enumerate(zip(wine.data, wine.target, strict=True)):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        email = f"customer{i:04d}@example.com"
        # repr of a Python float is the shortest text that reads back as the same double
        writer.writerow([name, email, *(repr(float(v)) for v in features), CULTIVARS[target]])
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=CSV_PATH, help=f"default: {CSV_PATH}")
    args = p.parse_args(argv)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(), encoding="utf-8", newline="")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
