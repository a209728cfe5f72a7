"""Config: typed schema (schema.py) and validated loading (load.py)."""

from quotagate.settings.load import Config, ConfigError, ConfigIssue, check_files, load_config

__all__ = ["Config", "ConfigError", "ConfigIssue", "check_files", "load_config"]
