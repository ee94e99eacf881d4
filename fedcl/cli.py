"""The `fedcl` command: distil a dataset, evaluate or show a synthetic set; extensions add `cl`, `simulate` and the
main demo job (`fedcl.flower.cli`).

Run `fedcl COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcl import __version__

_EPILOG = """examples:
  fedcl distill --dataset digits --method dm --ipc 10 --iterations 200 --seed 0 --out runs/dm
  fedcl evaluate runs/dm/synthetic.safetensors --dataset digits
  fedcl audit runs/dm/synthetic.safetensors --dataset digits
  fedcl show runs/dm/synthetic.safetensors --out grid.png
  fedcl demo
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits (embedded, default), fashion-mnist, mnist or cifar10")
    p.add_argument("--data-root", default=None,
                   help="directory with the dataset files "
                        "(Fashion-MNIST defaults to /usr/share/datasets/fashion-mnist)")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="convnet, mlp or lenet (default: the method's own network: mlp for dd, else convnet)")
    p.add_argument("--width", type=int, default=128, help="ConvNet/MLP width (default 128)")
    p.add_argument("--depth", type=int, default=3, help="ConvNet/MLP depth (default 3)")
    p.add_argument("--norm", default="instancenorm", help="ConvNet norm: instancenorm, batchnorm, layernorm, none")


def _add_eval(p: argparse.ArgumentParser, default_models: int) -> None:
    p.add_argument("--eval-models", type=int, default=default_models,
                   help=f"networks trained from scratch to evaluate (default {default_models})")
    p.add_argument("--eval-epochs", type=int, default=300, help="epochs per evaluation network (default 300)")
    p.add_argument("--no-eval-dsa", action="store_true", help="train evaluation networks without DSA")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcl", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Continual and federated learning whose memory is distilled data.")
    parser.add_argument("--version", action="version", version=f"fedcl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("distill", help="distil a dataset into a synthetic set",
                       description="Distil a dataset's training split into IPC synthetic images per class; write "
                                   "OUT/synthetic.safetensors (+ .json), OUT/grid.png and OUT/report.json, and "
                                   "for iterative methods OUT/checkpoint.safetensors (see --resume).")
    _add_common(p)
    _add_model(p)
    p.add_argument("--method", default="dm", help="distiller name (see `fedcl distill --list`)")
    p.add_argument("--list", action="store_true", help="list the available distillers and exit")
    p.add_argument("--ipc", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--iterations", type=int, default=None, help="distillation iterations (method default if unset)")
    p.add_argument("--batch-real", type=int, default=None, help="DM: real images per class per iteration")
    p.add_argument("--init", default=None, choices=["real", "noise"], help="DM: start from real images or noise")
    p.add_argument("--no-dsa", action="store_true", help="DM: no differentiable siamese augmentation")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast on CUDA too (on CPUs with native bf16 it is on by default)")
    p.add_argument("--factor", type=int, default=None,
                   help="multi-formation: every stored image holds FACTOR x FACTOR tiles, each a training image "
                        "(dm, idm, dance; default 1 for dm, 2 for idm and dance)")
    p.add_argument("--storage", default="float32", choices=["float32", "float16", "uint8"],
                   help="how the images are stored (uint8: quantised with a per-channel scale; default float32)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="stop iterating after this many seconds of wall time (checkpointed; --resume continues)")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="DM: differentially private distillation spending at most this epsilon over the run "
                        "(starts from noise; spent epsilon and delta go to report.json)")
    p.add_argument("--dp-delta", type=float, default=None, help="DM with --dp-epsilon: delta (default 1e-5)")
    p.add_argument("--dp-clip", type=float, default=None,
                   help="DM with --dp-epsilon: L2 clip norm of each real embedding (default sqrt(D)/2)")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="write OUT/checkpoint.safetensors every N iterations (default 50; 0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/checkpoint.safetensors (same options and seed)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method (repeatable; VALUE parsed as JSON, else a string), "
                        "e.g. --opt learn_labels=true --opt experts=runs/experts")
    p.add_argument("--out", required=False, default=None, help="output directory (default runs/<method>-<dataset>)")
    _add_eval(p, 0)

    p = sub.add_parser("evaluate", help="train fresh networks on a synthetic set and report test accuracy",
                       description="Train fresh networks on a saved synthetic set (the papers' protocol) and print "
                                   "the mean +- std test accuracy on the dataset's test split.")
    p.add_argument("synset", help="path to a .safetensors synthetic set")
    _add_common(p)
    _add_model(p)
    _add_eval(p, 3)

    p = sub.add_parser("audit", help="check a synthetic set for near-copies of real training images",
                       description="For every synthetic image, the distance to its nearest real training image "
                                   "(pixels and features of a fixed random ConvNet) relative to the median "
                                   "real-to-real nearest-neighbour distance; ratios below --threshold in either "
                                   "space flag a near-copy.  Prints a per-class summary and writes "
                                   "OUT/<set>.audit.json and OUT/<set>.audit_pairs.png (the closest pairs side by "
                                   "side), named after the audited file.")
    p.add_argument("synset", help="path to a .safetensors synthetic set")
    _add_common(p)
    p.add_argument("--threshold", type=float, default=0.5,
                   help="flag ratios below this (default 0.5: half the typical real-to-real gap)")
    p.add_argument("--real-sample", type=int, default=500,
                   help="real images whose nearest other real image sets the baseline (default 500)")
    p.add_argument("--out", default=None, help="output directory (default: the set's directory)")

    p = sub.add_parser("show", help="write a PNG grid of a synthetic set's images",
                       description="Write a PNG grid of a saved synthetic set's images, one row per class, in "
                                   "pixel space (the set's normalisation undone), and print what the set holds.")
    p.add_argument("synset", help="path to a .safetensors synthetic set")
    p.add_argument("--out", default=None, help="PNG path (default: next to the set, grid.png)")

    for module in _EXTENSIONS:
        _COMMANDS.update(importlib.import_module(module).register(sub))
    return parser


def _model_cfg(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "convnet":
        return {"width": args.width, "depth": args.depth, "norm": args.norm}
    if args.model == "mlp":
        return {"width": args.width, "depth": args.depth}
    return {}


def _train_config(args: argparse.Namespace):
    from fedcl.train import TrainConfig

    return TrainConfig(epochs=args.eval_epochs, dsa=not args.no_eval_dsa)


def _method_options(pairs: list[str]) -> dict[str, Any]:
    """`--opt KEY=VALUE` pairs as distiller options (VALUE as JSON when it parses, else the raw string)."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt expects KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def _check_dp_flags(wanted: dict[str, Any], accepted: set[str], method: str) -> None:
    """--dp-* flags need --dp-epsilon and a method that implements differential privacy (dm)."""
    dp_flags = [f"--{k.replace('_', '-')}" for k in ("dp_epsilon", "dp_delta", "dp_clip") if wanted[k] is not None]
    if dp_flags and "dp_epsilon" not in accepted:
        raise ValueError(f"{', '.join(dp_flags)}: differential privacy is implemented for --method dm only, "
                         f"not {method!r}")
    if dp_flags and wanted["dp_epsilon"] is None:
        raise ValueError(f"{', '.join(dp_flags)} need --dp-epsilon")


def _check_ipc(ipc: int, labels: Any, dataset: str) -> None:
    """Raise ValueError unless 1 <= ipc <= the size of the smallest class of the training split."""
    import torch

    smallest = int(torch.bincount(torch.as_tensor(labels)).min())
    if not 1 <= ipc <= smallest:
        raise ValueError(f"--ipc {ipc} is impossible: the smallest class of {dataset} has {smallest} training "
                         f"images; choose 1 to {smallest}")


def cmd_distill(args: argparse.Namespace) -> int:
    from fedcl.distill import available_distillers

    if args.list:
        print("\n".join(available_distillers()))
        return 0
    from fedcl.data import load_dataset
    from fedcl.distill import Source, create_distiller, distiller_class
    from fedcl.distill.base import accepted_options, default_model
    from fedcl.files import write_json
    from fedcl.train import evaluate_synthetic

    distiller_class(args.method)  # fail fast on an unknown name
    args.model = args.model or default_model(args.method)
    dataset = load_dataset(args.dataset, args.data_root, args.download)
    _check_ipc(args.ipc, dataset.train_labels, dataset.name)
    out = Path(args.out or f"runs/{args.method}-{dataset.name}")
    wanted = {"iterations": args.iterations, "batch_real": args.batch_real, "init": args.init,
              "dsa": False if args.no_dsa else None, "amp": args.amp or None, "dp_epsilon": args.dp_epsilon,
              "dp_delta": args.dp_delta, "dp_clip": args.dp_clip, "factor": args.factor,
              "budget_seconds": args.budget_seconds}
    accepted = accepted_options(args.method)
    _check_dp_flags(wanted, accepted, args.method)
    options = {k: v for k, v in wanted.items() if v is not None and k in accepted}
    options.update(_method_options(args.opt))
    distiller = create_distiller(args.method, model=args.model, model_cfg=_model_cfg(args), device=args.device,
                                 seed=args.seed, progress=True, checkpoint_dir=out,
                                 checkpoint_every=args.checkpoint_every, resume=args.resume,
                                 storage=args.storage, **options)
    print(f"distilling {dataset!r} with {args.method} ({args.ipc} images per class) on {distiller.device}")
    synset = distiller.distill(dataset.train_images, dataset.train_labels, ipc=args.ipc,
                               n_classes=dataset.n_classes, source=Source.of(dataset))
    synset.save(out / "synthetic.safetensors")
    synset.to_grid_png(out / "grid.png")
    report: dict[str, Any] = {"command": "distill", "method": args.method, "dataset": dataset.name,
                              "ipc": args.ipc, "n_images": len(synset), "nbytes": synset.nbytes,
                              "factor": synset.meta.factor, "storage": synset.meta.storage,
                              "n_training_images": len(synset.decode()),
                              "seed": args.seed, "device": str(distiller.device), "options": options,
                              "model": args.model, "model_cfg": _model_cfg(args), **synset.meta.extra}
    if args.eval_models > 0:
        result = evaluate_synthetic(synset, dataset, model=args.model, model_cfg=_model_cfg(args),
                                    n_models=args.eval_models, config=_train_config(args), device=args.device,
                                    seed=args.seed, progress=True)
        report["evaluation"] = result.to_dict()
        print(f"test accuracy: {result}")
    write_json(out / "report.json", report)
    print(f"wrote {out / 'synthetic.safetensors'}, {out / 'grid.png'}, {out / 'report.json'} "
          f"({len(synset)} images, {synset.meta.extra['seconds']:.1f} s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedcl.data import load_dataset
    from fedcl.synthetic import SyntheticSet
    from fedcl.train import evaluate_synthetic

    synset = SyntheticSet.load(args.synset)
    dataset = load_dataset(args.dataset, args.data_root, args.download)
    args.model = args.model or "convnet"
    result = evaluate_synthetic(synset, dataset, model=args.model, model_cfg=_model_cfg(args),
                                n_models=args.eval_models, config=_train_config(args), device=args.device,
                                seed=args.seed, progress=True)
    print(f"{synset.meta.method} set ({len(synset)} images) on {dataset.name}: test accuracy {result}")
    print(f"mean_accuracy={result.mean:.4f}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedcl.audit import audit_synthetic, closest_pairs_png
    from fedcl.data import load_dataset
    from fedcl.files import write_json
    from fedcl.synthetic import SyntheticSet

    synset = SyntheticSet.load(args.synset)
    dataset = load_dataset(args.dataset, args.data_root, args.download)
    report = audit_synthetic(synset, dataset, threshold=args.threshold, real_sample=args.real_sample,
                             seed=args.seed, device=args.device)
    out = Path(args.out) if args.out else Path(args.synset).parent
    stem = Path(args.synset).name.removesuffix(".safetensors")  # one report per set, even in a shared folder
    json_path, png_path = out / f"{stem}.audit.json", out / f"{stem}.audit_pairs.png"
    write_json(json_path, {"synset": str(args.synset), "dataset": dataset.name, "method": synset.meta.method,
                           "seed": args.seed, **report.to_dict()})
    closest_pairs_png(report, synset, dataset, png_path)
    print(report.table())
    print(f"flagged={int(report.flagged.sum())} of {len(synset)}; wrote {json_path}, {png_path}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from fedcl.synthetic import SyntheticSet

    synset = SyntheticSet.load(args.synset)
    out = Path(args.out) if args.out else Path(args.synset).with_name("grid.png")
    synset.to_grid_png(out)
    print(f"wrote {out} ({len(synset)} images, {len(synset.classes())} classes, method {synset.meta.method})")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "distill": cmd_distill, "evaluate": cmd_evaluate, "audit": cmd_audit, "show": cmd_show}

#: Modules that add subcommands (`cl`; `simulate` and `demo`): each has `register(subparsers) -> {name: handler}`
#: and keeps its top-level imports light (heavy libraries load inside the handlers), so `fedcl --help` is fast.
_EXTENSIONS: tuple[str, ...] = ("fedcl.avalanche.cli", "fedcl.flower.cli")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedcl` console script; user errors print one clear line and exit with status 2."""
    from fedcl.data import DatasetNotFoundError
    from fedcl.synthetic import SyntheticSetError

    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (DatasetNotFoundError, SyntheticSetError, ValueError, RuntimeError) as err:
        print(f"fedcl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
