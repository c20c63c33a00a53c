"""``python -m stmdit`` (and ``accelerate launch -m stmdit train ...``)."""

from stmdit.cli import app

app()
