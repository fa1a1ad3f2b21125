"""`python -m dva` is the `dva` command."""

from dva.cli import app

app(prog_name="dva")
