"""quotagate: a quota-enforcement gateway for multi-tenant Backend-as-a-Service platforms."""

from importlib import metadata

try:
    __version__ = metadata.version("quotagate")
except metadata.PackageNotFoundError:  # run from a tree that was never installed
    __version__ = "0+unknown"
