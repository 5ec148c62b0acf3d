"""The control plane's rules, pure: records and their state enums, authorization, the rollout
plan and its state table, experiment statistics and state table, the retraining policy and
job table, sample vetting, telemetry validation, the audit hash chain.

Nothing here does I/O, reads a clock or knows about grpc, paho or SQL: services pass in the
time and the rows, and get decisions back.
"""
