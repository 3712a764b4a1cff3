"""The `dashboard` command: the web page for the training runs and a local registry, without loading a model."""
from __future__ import annotations

import os
from pathlib import Path

from peftkit.cli.registry_cmds import HOME_HELP


def register(sub) -> None:
    """Add the dashboard command to the CLI."""
    p = sub.add_parser("dashboard", help="web page for training runs and the registry, without a model (no playground)",
                       description="Serve the page `peftkit serve` shows at /, without loading a model: training runs "
                                   "(live while they train) and the registry. For the playground, use `peftkit serve`.")
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of training runs (default: runs)")
    p.add_argument("--registry", metavar="DIR", help=HOME_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback requires an API key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"),
                   help="bearer key the page asks for before it shows anything (default: $PEFTKIT_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow listening beyond loopback without an API key")
    p.add_argument("--open", action="store_true", help="open the page in this machine's web browser")
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args) -> int:
    from peftkit.dashboard import Dashboard
    from peftkit.dashboard.app import serve_dashboard

    dash = Dashboard(runs=Path(args.runs), registry=args.registry, api_key=args.api_key or None, playground=False)
    serve_dashboard(dash, args.host, args.port, allow_no_auth=args.insecure_no_auth, open_browser=args.open)
    return 0
