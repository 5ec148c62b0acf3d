"""Operator tools apart from the serving path: `control-plane init` (a new home: CA, keys,
the first admin), `backup`/`restore`, and `mqtt-config` (the broker's configuration)."""
