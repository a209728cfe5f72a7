"""The realtime front door: WebSockets on realtime routes, relayed to their upstream with
each watch counted (frames.py, relay.py, watches.py, upgrade.py)."""
