"""peftkit's own recipe: `peftkit.train.train(cfg)` on the config the bench froze for it.

    python -m peftkit.bench.recipes.peftkit_run --spec SPEC.json --out RESULT.json

The config is the user's with only the bench's overrides (steps, the shared train rows, no eval split,
a fresh data cache, the output folder, no registry), so this measures peftkit as configured.
"""
from __future__ import annotations

import sys

from peftkit.bench.recipes import measure


def train(spec: dict, meter: measure.Meter):
    """Return the model after `peftkit.train.train` on the spec's config."""
    import peftkit.train as run
    from peftkit.config import load_config

    cfg = load_config(spec["config_file"])
    build = run.build_trainer

    def build_and_measure(*args, **kwargs):
        trainer = build(*args, **kwargs)
        # peftkit pads with a token that is never EOS or end-of-turn, so pad ids are exactly the padding.
        meter.attach(trainer, pad_id=trainer.processing_class.pad_token_id)
        return trainer

    run.build_trainer = build_and_measure  # train() takes no callbacks; its trainer is built here and nowhere else
    return run.train(cfg, register=False).model


if __name__ == "__main__":
    sys.exit(measure.main(train))
