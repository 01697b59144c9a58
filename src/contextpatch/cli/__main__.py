"""``python -m contextpatch.cli``: the same command line as the ``contextpatch`` script."""

from . import app

app(prog_name="contextpatch")
