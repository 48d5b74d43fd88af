"""The typed sweep: its settings (frozen dataclasses), loading them from YAML with the schema's defaults, and the checks."""
