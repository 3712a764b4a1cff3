"""Commands that turn adapters into other artefacts: merge (into the base), export (GGUF), mix (adapters into one)."""
from __future__ import annotations


def register(sub) -> None:
    """Add the merge, export and mix commands to the CLI."""
    from peftkit.export import GGUF_TYPES
    from peftkit.mix import COMBINATIONS

    p = sub.add_parser("merge", help="fold a LoRA/DoRA/IA3 adapter into its base: a plain transformers folder, verified",
                       description="Writes the merged model only after its logits, reloaded from disk, match base + adapter "
                                   "on sample prompts within the tolerance for its dtype (docs/merge.md).")
    p.add_argument("adapter", metavar="REF_OR_DIR", help="adapter folder, run folder or registry reference (name, name@3, name:tag)")
    p.add_argument("--out", required=True, help="folder to write the merged model to (replaced atomically)")
    _common(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="dtype to merge in (default: the base's stored dtype)")
    p.add_argument("--register", metavar="NAME", help="add the merged model to the registry under NAME")
    p.add_argument("--nf4-base", action="store_true",
                   help="QLoRA only: merge into the base as its 4-bit NF4 copy (dequantized) that training saw, so the "
                        "merged model answers as the trained QLoRA model did (default: the original base)")
    p.set_defaults(func=cmd_merge)

    export = sub.add_parser("export", help="write a model or adapter in another format").add_subparsers(
        dest="format", required=True, metavar="FORMAT")
    p = export.add_parser("gguf", help="a GGUF file for llama.cpp / Ollama (merges an adapter first), read back and checked")
    p.add_argument("source", metavar="REF_OR_DIR", help="adapter (merged first, in a temporary folder) or full model folder")
    p.add_argument("--out", required=True, help="the .gguf file to write; an Ollama Modelfile is written beside it")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES, help="tensor type of the 2-D weights (default f16)")
    p.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name when the tokenizer is not one it recognises")
    _common(p)
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("mix", help="combine LoRA adapters of one base into a new adapter (peft add_weighted_adapter)")
    p.add_argument("adapters", nargs="+", metavar="REF_OR_DIR", help="two or more LoRA adapters trained on the same base")
    p.add_argument("--weights", help="comma-separated weight per adapter (default: equal weights summing to 1)")
    p.add_argument("--name", required=True, help="registry name of the mixed adapter")
    p.add_argument("--combination", default="cat", choices=COMBINATIONS,
                   help="how peft combines them (default cat: exactly the weighted sum of the updates, at the sum of the "
                        "ranks; linear mixes A and B separately, an approximation)")
    p.add_argument("--density", type=float, help="fraction of values kept, for ties and the dare_* combinations")
    p.add_argument("--out", help="folder for the mixed adapter (default runs/NAME)")
    p.add_argument("--registry", help="registry folder (default: $PEFTKIT_HOME/registry)")
    p.add_argument("--no-register", action="store_true", help="only write the folder")
    p.add_argument("--force", action="store_true", help="mix even though the parents were trained with different prompting")
    p.set_defaults(func=cmd_mix)


def _common(p) -> None:
    p.add_argument("--base", help="base model (default: the one the adapter's lineage names)")
    p.add_argument("--registry", help="registry folder (default: $PEFTKIT_HOME/registry)")


def cmd_merge(args) -> int:
    from peftkit.merge import merge

    merge(args.adapter, args.out, registry=args.registry, base=args.base, dtype=args.dtype, register=args.register,
          nf4_base=args.nf4_base)
    return 0


def cmd_export_gguf(args) -> int:
    from peftkit.export import export_gguf

    export_gguf(args.source, args.out, gguf_type=args.type, registry=args.registry, base=args.base,
                tokenizer_pre=args.tokenizer_pre)
    return 0


def cmd_mix(args) -> int:
    from peftkit.mix import mix, parse_weights

    weights = parse_weights(args.weights, len(args.adapters))
    mix(args.adapters, weights, name=args.name, combination=args.combination, density=args.density, out=args.out,
        registry=args.registry, register=not args.no_register, force=args.force)
    return 0
