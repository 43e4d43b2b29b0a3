"""Model repository: model folders, model.toml, and the built-in models."""
