"""Command-line entry points, one module per MLflow entry point: they parse and
validate parameters, then call the library."""
