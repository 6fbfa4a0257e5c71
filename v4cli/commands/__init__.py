"""CLI commands: one module per area, each with `register(app)`. Only this layer imports Typer and Rich."""
