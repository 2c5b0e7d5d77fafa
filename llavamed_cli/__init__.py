"""llavamed_cli: the thin Typer front end of llavamed_core (see DESIGN.md)."""
