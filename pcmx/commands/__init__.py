"""Subcommands of the ``pcmx`` CLI, one module each (``NAME``, ``HELP``, ``add_arguments``, ``run``)."""
