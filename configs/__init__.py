"""Bundled YAML configs, shipped as package data so `--config NAME.yaml` works from any directory."""
