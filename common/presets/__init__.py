"""Packaged config presets (YAML)."""
