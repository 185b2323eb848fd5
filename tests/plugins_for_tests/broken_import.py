"""A plugin module that fails on import, as a half-installed package would."""

raise ImportError("this plugin needs the package 'capsgan-missing-dependency', which is not installed")
