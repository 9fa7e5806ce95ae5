"""The ``segpipe`` command line: thin Typer commands over the ``segpipe`` library."""
