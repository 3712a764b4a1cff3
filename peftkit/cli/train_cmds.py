"""Commands that train and talk to models: train, generate, chat, demo, config."""
from __future__ import annotations

import argparse
import json
import logging


def register(sub) -> None:
    """Add the training and generation commands to the CLI."""
    p = sub.add_parser("train", help="fine-tune an adapter from a YAML config, or from a generic preset with --data",
                       description="Either CONFIG (a YAML file) or --data FILE, which picks the generic preset "
                                   "configs/<model>/<method>.yaml for --model and --method.")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/smollm2-135m/lora.yaml (omit with --data)")
    p.add_argument("--data", help="training data file (sets data.path); without CONFIG it picks a generic preset")
    p.add_argument("--model", help="with --data and no CONFIG: the preset's model, a folder under configs/ or its "
                                   "model.name (default smollm2-135m, the bundled model)")
    p.add_argument("--method", help="with --data and no CONFIG: the preset's method (default lora)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method.rank=32 (repeatable; applied last)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even though the data, config or base model changed since the checkpoint")
    p.add_argument("--no-register", action="store_true", help="do not add the adapter to the registry")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train as N processes (one per GPU, or N CPU processes over gloo) through `accelerate launch` "
                        "with the shipped config for --strategy; see docs/distributed.md")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "zero3"],
                   help="with --nproc: ddp copies the model to every process; fsdp and zero3 (DeepSpeed ZeRO-3, after "
                        "pip install deepspeed) shard it across them (default ddp)")
    p.set_defaults(func=cmd_train)

    for name, help_text in (("generate", "answer one prompt with the base model or an adapter"),
                            ("chat", "chat interactively, tokens streamed as they come")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--adapter", help="adapter folder, run folder or registry reference (name, name@3, name:tag)")
        p.add_argument("--base", help="base model (default: the adapter's base, else smollm2-135m-instruct)")
        p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
        p.add_argument("--registry", help="registry folder (default: $PEFTKIT_HOME/registry)")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0 if name == "generate" else 0.7)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--seed", type=int)
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the user message")
            p.add_argument("--system", help="system message (default: the one the adapter was trained with)")
            p.set_defaults(func=cmd_generate)
        else:
            p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="train the bundled model on the sample data and compare answers")
    p.add_argument("config", nargs="?", default="configs/demo/fernhill.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="show a resolved config, or list every key with its help")
    p.add_argument("config", nargs="?", help="YAML config (omit to list all keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_config)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def cmd_train(args) -> int:
    from peftkit.config import ConfigError, load_config
    from peftkit.presets import pick_preset
    from peftkit.train import train

    _logging()
    if args.config is None:
        if args.data is None:
            raise ConfigError("pass a YAML config (e.g. configs/smollm2-135m/lora.yaml) or your data: "
                              "peftkit train --data my.jsonl [--model M] [--method lora]")
        config, preset_sets = pick_preset(args.model, args.method)
        logging.getLogger(__name__).info("preset: %s", config)
    elif args.model is not None or args.method is not None:
        raise ConfigError("--model and --method pick a preset when no CONFIG is given; with a CONFIG use "
                          "--set model.name=... or --set method.name=...")
    else:
        config, preset_sets = args.config, []
    # JSON-quoted: YAML reads it back as the same string, whatever the file is called (true, 1.5, a: b).
    data_sets = [f"data.path={json.dumps(args.data)}"] if args.data is not None else []
    cfg = load_config(config, preset_sets + data_sets + args.overrides)
    prepare_ranks(cfg, args)
    result = train(cfg, resume=args.resume, force_resume=args.force_resume,
                   register=False if args.no_register else None)
    from peftkit.distributed import is_main_process

    if not is_main_process():
        return 0
    m = result.metrics
    print(f"adapter: {result.adapter_dir}")
    print(f"train loss {m['train_loss_first']} -> {m['train_loss']}, eval loss {m['eval_loss']}, "
          f"{m['tokens_per_second']:.0f} tokens/s, {m['wall_time_s']:.0f} s")
    if result.registry_ref:
        print(f"registered: {result.registry_ref}")
    return 0


def prepare_ranks(cfg, args) -> None:
    """Start the --nproc processes (this process becomes the launcher), or check what a launcher started."""
    from peftkit import distributed
    from peftkit.config import ConfigError
    from peftkit.methods.catalog import CATALOG

    if args.nproc is not None:
        if distributed.world_size() > 1:
            raise ConfigError("--nproc starts the processes itself; under accelerate launch or torchrun leave it out")
        from peftkit.launch import launch

        launch(args.nproc, args.strategy, args.argv, quantized=CATALOG[cfg.method.name].quantized_base)
    distributed.check_launch()
    if distributed.sharding() and cfg.eval.generate:
        raise ConfigError(f"eval.generate=true cannot run when {distributed.sharding()} shards the model (the main "
                          "process generates alone); set eval.generate=false and run `peftkit eval` on the adapter")
    distributed.allow_fsdp_on_cpu()


def cmd_generate(args) -> int:
    from peftkit.generate import generate, load_session

    session = load_session(args.adapter, base=args.base, dtype=args.dtype, registry=args.registry)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    print(generate(session, [messages], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)[0])
    return 0


def cmd_chat(args) -> int:
    from peftkit.generate import chat_loop, load_session

    session = load_session(args.adapter, base=args.base, dtype=args.dtype, registry=args.registry)
    chat_loop(session, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    return 0


def cmd_demo(args) -> int:
    from peftkit.demo import run_demo

    _logging()
    run_demo(args.config, args.overrides)
    return 0


def cmd_config(args) -> int:
    import yaml

    from peftkit.config import all_keys, config_to_dict, load_config

    if args.config is None and not args.overrides:
        for key, doc in all_keys().items():
            print(f"{key:32} {doc}")
        return 0
    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0
