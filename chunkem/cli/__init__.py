"""The ``chunkem`` command line: one module per verb (see :mod:`chunkem.cli.main`)."""
