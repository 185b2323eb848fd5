"""Recipes: the schema, TOML reading and writing, and building components from a recipe."""
