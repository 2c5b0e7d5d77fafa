"""llavamed_core: the library behind the `llavamed` command.

Everything that does work lives here and is usable from Python without the CLI. Nothing in this
package prints, exits, or imports Rich or Typer; it returns results and raises
:class:`llavamed_core.errors.LlavamedError` subclasses.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
