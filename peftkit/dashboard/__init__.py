"""The web page at `/`: training runs with live loss curves, the registry, and a playground comparing adapters.

`peftkit serve` adds it beside the OpenAI-compatible routes (same process, same API key);
`peftkit dashboard` serves it alone, without a model, for the runs and the registry only.
The page is plain HTML, CSS and JavaScript modules shipped in static/: nothing to build, nothing
fetched from another host. No torch here.
"""
from peftkit.dashboard.routes import Dashboard, add_dashboard, is_public

__all__ = ["Dashboard", "add_dashboard", "is_public"]
