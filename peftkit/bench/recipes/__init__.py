"""Training recipes that `peftkit bench train` compares, each run as its own process.

    python -m peftkit.bench.recipes.seed --spec SPEC.json --out RESULT.json

Every recipe reads the same spec (model folder, train and eval files, LoRA settings, steps, batch,
dtype), trains its own way, and hands its trained model to `measure.main`, which times the loop,
counts the tokens fed and scores the held-out rows identically for all of them.
"""
