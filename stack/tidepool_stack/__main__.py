"""`python -m tidepool_stack`."""

from tidepool_stack.cli import app

app()
