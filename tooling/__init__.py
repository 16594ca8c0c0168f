"""Development and operator tooling around the service: `mmsent demo`, `mmsent bench`, `mmsent reconcile`, and the
throwaway loopback services (broker, Redis, image server) that they and the tests start.

Not part of the service: `consumer` never imports this package (tests/test_layering.py), the container image does
not carry it, and its own dependencies (noida-db, psutil) come with the `tools` extra. `consumer/cli.py` mounts
`tooling.cli` when it is installed.
"""
