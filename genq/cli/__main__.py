"""`python -m genq.cli ...`: how `genq worker` starts its sibling reaper and how the e2e tests run genq."""

from genq.cli import app

app()
