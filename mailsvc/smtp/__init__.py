"""SMTP as pure state machines: bytes in, events out; events in, bytes out.

Nothing in this package does I/O or imports Twisted (see DESIGN.md).
"""
