"""Real datasets that install from package registries, read offline, and a prepared-data cache."""
