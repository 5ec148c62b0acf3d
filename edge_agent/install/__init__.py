"""The agent's install path, module by module in the order an install happens:

* ``release_trust`` — accept a signed release document (high-water mark, last accepted release).
* ``download`` — fetch the bundle it names, resumably, and check its digest and length.
* ``lifecycle`` — the install state machine (downloading ... committed), as a pure table.
* ``smoke`` — the smoke test an unpacked, verified bundle must pass before it serves.
* ``model_store`` — the on-disk store: verify, stage, smoke-test, activate, commit, roll back.
* ``probation`` — watch a newly activated version; commit it or roll it back locally.
* ``updater`` — drive all of the above from the accepted release document.
"""
