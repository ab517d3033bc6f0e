"""The `genq` command: servers (api, worker, reaper, migrate, keys), embedded runs, and API clients.

`app` is the console-script entry point; each command is a plain function in the module for its
kind: servers.py (the deployment's processes), embedded.py (`genq run`), client.py (API clients).
"""

from __future__ import annotations

import typer

from genq.cli import catalog, client, embedded, feedback, servers

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="genq: self-hosted, OpenAI-compatible batch generation.")
for _command in (servers.api, servers.migrate, servers.worker, servers.reaper, servers.export):
    app.command()(_command)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
keys_app.command("create")(servers.keys_create)
keys_app.command("list")(servers.keys_list)
keys_app.command("revoke")(servers.keys_revoke)
app.add_typer(keys_app, name="keys")
app.add_typer(catalog.app, name="catalog")
for _command in (embedded.run, client.submit, client.status, client.results, feedback.feedback):
    app.command()(_command)

__all__ = ["app"]
