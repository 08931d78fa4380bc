"""Configuration: the typed schemas of every user-facing key (schema.py: train.py's; tool_schemas.py: the
other entry points'). Their choices come from the registries of the library (datasets, transforms, models,
sampling modes), so this package sits above the library and below ``flowgen.build`` and ``flowgen.cli``; the
range checks the schemas attach are ``flowgen.checks``, shared with the library's own argument checks.
``flowgen.cli`` registers the schemas in Hydra's ConfigStore before any entry point composes its config."""
