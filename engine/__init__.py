"""dtbuild's engine: loading, analysis, execution, the store, the plugin manager and the CLI."""
