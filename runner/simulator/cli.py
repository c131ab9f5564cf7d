"""``batchrun simulate``: one option per SimConfig field, generated, so none is ever missing.

Importing this module loads neither aiohttp nor tiktoken: the server is imported when the
command runs, so ``batchrun --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .config import SimConfig, _Setting, _settings

_HELP = """Serve the built-in OpenAI-compatible simulator until Ctrl-C.

It answers chat completions, responses, embeddings, the Files API and the Batch API, bills
every reply into a ledger (GET /_sim/ledger) and injects the faults asked for. Point batchrun
at the URL it prints with --base-url (any key works unless --api-key is set).

Example: batchrun simulate --port 8765 --rpm 600 --p-429 0.1
"""
_TYPES: dict[type, click.ParamType[Any]] = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _option(setting: _Setting) -> click.Option:
    flag = "--" + setting.name.replace("_", "-")
    if setting.kind is bool:
        return click.Option(
            [f"{flag}/--no-{flag[2:]}", setting.name],
            default=setting.default,
            show_default=True,
            help=setting.help,
        )
    return click.Option(
        [flag, setting.name],
        type=_TYPES[setting.kind],
        default=setting.default,
        show_default=setting.default is not None,
        help=setting.help,
    )


def _run(host: str, port: int, prices: Path | None, **settings: Any) -> None:
    try:
        config = SimConfig(**settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    table = None
    if prices is not None:
        from ..errors import PriceError
        from ..pricing import load_price_table

        try:
            table = load_price_table(prices)
        except PriceError as exc:
            raise click.BadParameter(str(exc), param_hint="--prices") from None
    from .server import serve

    try:
        serve(config, host, port, table)
    except OSError as exc:
        raise click.UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


simulate = click.Command(
    "simulate",
    callback=_run,
    help=_HELP,
    short_help="Serve the built-in OpenAI-compatible simulator.",
    params=[
        click.Option(
            ["--host"], default="127.0.0.1", show_default=True, help="Address to listen on."
        ),
        click.Option(
            ["--port"],
            type=click.IntRange(0, 65535),
            default=8765,
            show_default=True,
            help="Port to listen on (0: any free port).",
        ),
        click.Option(
            ["--prices"],
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            metavar="FILE",
            help="A price TOML file merged over the bundled price table.",
        ),
        *(_option(setting) for setting in _settings()),
    ],
)
