"""The ``vtexit`` commands, one module per group; :mod:`vtexit.app.cli` registers them on the root app."""
