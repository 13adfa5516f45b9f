"""The sans-IO protocol core: records, Noise, the IK handshake, frames, the mux,
the session engine and path switching.

Nothing in this package does I/O or imports an event loop (tests/test_layering.py
checks it): bytes, local actions and ``now`` go in; bytes, events and deadlines
come out.
"""
