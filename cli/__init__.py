"""The `jaxreg` command line: a thin Typer layer over the library (parse, call, print)."""
