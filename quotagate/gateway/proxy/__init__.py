"""The HTTP front door: each request on the public listener decided and proxied to its
upstream (handler.py)."""
