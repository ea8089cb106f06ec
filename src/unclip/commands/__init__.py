"""Subcommands of the ``unclip`` command, one module per family (see ``unclip.cli``)."""
