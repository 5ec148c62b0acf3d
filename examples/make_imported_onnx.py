"""Make the ONNX model that `examples/pipelines/imported-onnx.toml` imports: a scikit-learn
pipeline (StandardScaler + LogisticRegression) fitted on the bundled wine data and converted
with skl2onnx, as another tool would hand it over (its own input name, two outputs: "label"
and "probabilities").

    .venv/bin/python examples/make_imported_onnx.py --out examples/pipelines
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def build_model() -> Any:
    """The scikit-learn model the ONNX file holds (deterministic: lbfgs, no randomness)."""
    data = load_wine()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return model.fit(data.data.astype("float32"), data.target)


def make(out_dir: Path, name: str = "wine-logreg.onnx") -> Path:
    data = load_wine()
    model = build_model()
    onx = convert_sklearn(
        model, initial_types=[("float_input", FloatTensorType([None, data.data.shape[1]]))],
        options={LogisticRegression: {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_bytes(onx.SerializeToString())
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "pipelines",
                   help="directory for wine-logreg.onnx (default: examples/pipelines)")
    args = p.parse_args(argv)
    print(make(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
