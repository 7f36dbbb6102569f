"""``python -m scenecluster.config > docs/configuration.md``: the settings reference, from the fields themselves."""

from scenecluster.config.reference import configuration_markdown

print(configuration_markdown(), end="")
