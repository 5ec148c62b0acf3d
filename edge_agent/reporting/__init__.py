"""What the agent reports back, module by module in the order a report travels:

* ``drift`` — drift of live traffic against the bundle's profile, one window at a time.
* ``outbox`` — the bounded SQLite queue every report (drift windows, arm stats, labelled
  samples made by ``edge_agent.supervisor``) waits in until acknowledged.
* ``telemetry`` — the sender: encode records, send the outbox, delete what was acknowledged.
"""
