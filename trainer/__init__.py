"""The Edgefleet trainer: data to a signed, compressed model bundle (arrives with issue 3)."""

__all__: list[str] = []
