"""``vera-serve``: serve, train an adapter, convert adapters, export a merged model."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server import config as server_config
from server.cluster import config as cluster_config


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.runtime import Runtime

    cfg = server_config.from_args(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    runtime = Runtime.build(cfg)
    app = create_app(runtime)
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=120,  # SIGTERM: drain in-flight requests first
        timeout_keep_alive=30,  # outlive client pools' idle connections (no reset races)
    )
    return 0


def _cluster(args: argparse.Namespace) -> int:
    try:
        from server.cluster.launcher import run
    except ImportError as e:
        raise ValueError(f"{e} (pip install 'vera-serve[cluster]')") from e

    cfg = server_config.from_args(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    return run(cfg, cluster_config.from_args(args))


def _load_vm(args: argparse.Namespace):
    from server.model_source import load_model
    from vera_core import VeraConfig, inject_vera
    from vera_core.config import parse_targets

    model, tok, _ = load_model(args.model)
    targets = parse_targets(args.target_modules)
    cfg = VeraConfig(r=args.r, projection_prng_key=args.projection_prng_key, target_modules=targets)
    return inject_vera(model, cfg, num_slots=2), tok


def _train(args: argparse.Namespace) -> int:
    from server.config import vera_home
    from vera_core.adapter_file import save_adapter
    from vera_core.train import TrainConfig, train_adapter
    from vera_core.train_data import DataLimits, read_examples

    vm, tok = _load_vm(args)
    context = getattr(vm.model.config, "max_position_embeddings", None) or 2048
    limits = DataLimits.offline(context)  # every example must fit the model's context
    examples = read_examples(Path(args.data).read_bytes(), tok, limits)
    cfg = TrainConfig(**{name: getattr(args, name) for name in _TRAIN_FLAGS})
    anchor = None
    if cfg.anchor_weight > 0:  # the base model's answers to keep: made once per model
        from server.finetune.references import anchor_references

        anchor = anchor_references(vm.model, tok, vera_home() / "references")
    adapter, report = train_adapter(vm, tok, examples, cfg, anchor=anchor)
    save_adapter(adapter, args.out)
    print(f"trained: {report.summary()}")
    print(f"wrote {args.out} ({adapter.num_params} params)")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    from vera_core.adapter_file import load_adapter
    from vera_core.peft_compat import save_peft_dir

    vm, _ = _load_vm(args)
    adapter = load_adapter(args.adapter)
    adapter.check_fits(vm.layout, vm.config.projection_prng_key)
    save_peft_dir(adapter, vm, args.out, save_projection=not args.no_projection)
    print(f"wrote PEFT adapter directory {args.out}")
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    from vera_core import model_fingerprint
    from vera_core.adapter_file import save_adapter
    from vera_core.peft_compat import load_peft_dir

    vm, _ = _load_vm(args)
    adapter = load_peft_dir(args.peft_dir, vm.projections)
    adapter.check_fits(vm.layout, vm.config.projection_prng_key)
    from dataclasses import replace

    from vera_core.adapter import Adapter

    header = replace(adapter.header, base_fingerprint=model_fingerprint(vm.model))
    save_adapter(Adapter(header, adapter.vectors), args.out)
    print(f"wrote {args.out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from vera_core.adapter_file import load_adapter
    from vera_core.merge import export_merged

    vm, tok = _load_vm(args)
    export_merged(vm, load_adapter(args.adapter), args.out, tokenizer=tok)
    print(f"wrote merged model directory {args.out}")
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF causal-LM dir, or 'default'")
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--projection-prng-key", type=int, default=0)
    p.add_argument("--target-modules", default="", help="comma-separated; empty = PEFT default")


# TrainConfig fields the train command exposes; each flag defaults to the field's default.
_TRAIN_FLAGS = {
    "epochs": "passes over the data; auto: a few passes in --min-steps..--max-steps steps",
    "min_steps": "fewest optimizer steps when --epochs is not given (small datasets)",
    "max_steps": "most optimizer steps when --epochs is not given (large datasets)",
    "batch_size": "examples per optimizer step",
    "lr": "peak learning rate (VeRA wants far higher rates than LoRA)",
    "seed": "shuffling seed",
    "anchor_weight": "weight of the KL to the base model's own answers on shipped general "
    "prompts (keeps what the model knew; 0: off)",
}


def _train_flags(p: argparse.ArgumentParser) -> None:
    from vera_core.train import TrainConfig

    defaults = TrainConfig()
    for name, text in _TRAIN_FLAGS.items():
        default = getattr(defaults, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int if default is None else type(default),
            default=default,
            help=f"{text} (default: {'auto' if default is None else default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vera-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    server_config.add_arguments(serve)
    serve.set_defaults(func=_serve)

    cluster = sub.add_parser(
        "cluster", help="N engine replicas on Ray Serve behind one port (needs ray[serve])"
    )
    server_config.add_arguments(cluster)
    cluster_config.add_arguments(cluster)
    cluster.set_defaults(func=_cluster)

    train = sub.add_parser("train", help="fine-tune one user's adapter from a JSONL file")
    _model_flags(train)
    train.add_argument(
        "--data",
        required=True,
        help="JSONL: {'messages': [...]} or {'prompt': ..., 'completion': ...} per line",
    )
    train.add_argument("--out", required=True, type=Path, help="adapter file to write")
    _train_flags(train)
    train.set_defaults(func=_train)

    exp = sub.add_parser("export-peft", help="adapter file -> PEFT VeRA directory")
    _model_flags(exp)
    exp.add_argument("adapter", type=Path)
    exp.add_argument("--out", required=True, type=Path)
    exp.add_argument("--no-projection", action="store_true", help="save_projection=false")
    exp.set_defaults(func=_export_peft)

    imp = sub.add_parser("import-peft", help="PEFT VeRA directory -> adapter file")
    _model_flags(imp)
    imp.add_argument("peft_dir", type=Path)
    imp.add_argument("--out", required=True, type=Path)
    imp.set_defaults(func=_import_peft)

    merge = sub.add_parser("merge", help="write an HF model directory with an adapter merged")
    _model_flags(merge)
    merge.add_argument("adapter", type=Path)
    merge.add_argument("--out", required=True, type=Path)
    merge.set_defaults(func=_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"vera-serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
