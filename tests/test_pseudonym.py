"""One pseudonymization function (``fleetcore.pseudonym``): the agent's labelled samples and the
trainer's feature store map the same value under the same key to the same pseudonym."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np

from edge_agent import supervisor
from fleetcore import pseudonym
from trainer.sources import RawTable
from trainer.store import KEY_BYTES, FeatureStore

VALUES = ["customer0042@example.com", "Zoë Ünïcode", "", "1234", "a" * 500]


def test_the_agent_uses_fleetcores_function() -> None:
    assert supervisor.pseudonymize is pseudonym.pseudonymize


def test_agent_and_trainer_pseudonyms_agree(tmp_path: Path) -> None:
    # The agent's key, as the supervisor makes it (sample.key, 0600) ...
    key = supervisor.load_sample_key(tmp_path / "sample.key")
    assert len(key) == KEY_BYTES
    agent_side = [supervisor.pseudonymize(key, v) for v in VALUES]

    # ... given to a feature store as its key: the store pseudonymizes PII on ingest.
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    (root / "store.key").write_bytes(key)
    (root / "store.key").chmod(0o600)
    n = len(VALUES)
    table = RawTable(
        feature_names=["x"], X=np.zeros((n, 1), np.float32), y=np.arange(n) % 2,
        labels=["no", "yes"], pii={"email": np.array(VALUES)}, source="test:pseudonym",
        source_digest="sha256:" + "0" * 64, image_shape=None,
    )
    with FeatureStore(root) as store:
        assert store.key_path.read_bytes() == key
        snapshot = store.get(store.ingest(table, region="eu-west-1").id)
    trainer_side = snapshot.pii["email"].tolist()

    assert agent_side == trainer_side
    assert agent_side[0] == hmac.new(key, VALUES[0].encode(), hashlib.sha256).hexdigest()
    assert len(set(agent_side)) == n  # distinct values stay distinct
