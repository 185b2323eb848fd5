"""Plugin machinery: hook specifications, run events, the registry and its families, plugin loading."""
