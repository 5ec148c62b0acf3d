"""Data from where businesses keep it: SQL databases, Parquet files, HTTP JSON APIs and
message streams, read under limits into the feature store (trainer.store), in batch and
continuously, with lineage. See docs/trainer.md, "Data sources"."""
