"""Shared test set-up. The lab fixtures come from the project's own pytest plugin
(``srht_readonly.testing.plugin``), loaded through its ``pytest11`` entry point."""

pytest_plugins = ["pytester"]
