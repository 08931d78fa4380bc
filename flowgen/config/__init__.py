"""Configuration: the typed schemas of every user-facing key (schema.py) and their range checks
(checks.py). Imports nothing above the library layers; ``flowgen.cli`` registers the schemas in
Hydra's ConfigStore before any entry point composes its config."""
