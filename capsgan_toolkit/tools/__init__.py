"""Tools built on the API: bench, probe, sampling pictures, the plugin scaffold."""
