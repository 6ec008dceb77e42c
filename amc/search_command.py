"""``amc search``: find per-layer preserve ratios under a MACs (or latency) budget with a search agent (DDPG, GA,
random search or the sensitivity allocator), print the per-group table and the before/after figures, save the
compressed network.

With no arguments it trains the small residual + concat CNN for a few seconds on scikit-learn's digits and runs a
short DDPG search to half the MACs with L2 channel pruning as the action. Rewards are measured on the held-out split
of the training data; the test split is only reported.
"""
from __future__ import annotations

import argparse
from typing import Any

TUNERS = {"ddpg": "DDPGTuner", "ga": "GATuner", "random": "RandomSearchTuner", "sensitivity": "SensitivityTuner"}


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``amc search`` to the ``amc`` subcommands."""
    from amc.cli import fraction
    from amc.compress_command import add_network_arguments
    from compressors.tuners.actions import ACTIONS
    from compressors.tuners.rewards import REWARDS

    parser = commands.add_parser(
        "search", help="search per-layer compression ratios under a MACs or latency budget (DDPG, GA ...)",
        description="Capture -> search per-group preserve ratios (rewards on held-out training data) -> compressed "
                    "network at the best policy -> optional fine-tuning -> report -> save.")
    add_network_arguments(parser)
    parser.add_argument("--tuner", default="ddpg", choices=sorted(TUNERS), help="search agent")
    parser.add_argument("--compressor", default="l2", choices=sorted(ACTIONS),
                        help="the action: how each unit is compressed (channel groups by L2, Taylor or LASSO/LS; "
                             "layers' ranks by low-rank)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--flops-target", type=fraction(), default=0.5, help="fraction of the MACs to keep")
    target.add_argument("--latency-target", type=fraction(), help="fraction of the measured CPU latency to keep")
    target.add_argument("--accuracy-threshold", type=float,
                        help="accuracy-first: the smallest MACs whose held-out accuracy stays within this of the "
                             "original, by bisection over the budget (a few searches)")
    parser.add_argument("--episodes", type=int, default=60, help="policies to evaluate")
    parser.add_argument("--warmup", type=int, help="DDPG's random warm-up episodes (default: a third)")
    parser.add_argument("--population", type=int, default=10, help="GA population")
    parser.add_argument("--round-to", type=int, help="keep channel counts at multiples of this")
    parser.add_argument("--lbound", type=fraction(), default=0.2, help="lowest preserve ratio of a group")
    parser.add_argument("--reward", default="accuracy", choices=sorted(REWARDS))
    parser.add_argument("--heldout-images", type=int, default=500, help="held-out images per reward")
    parser.add_argument("--calibration-images", type=int, default=256,
                        help="training images for BatchNorm re-estimation (0: none)")
    parser.add_argument("--evaluation", default="pruned", choices=("pruned", "masked"),
                        help="measure rewards on the pruned network or on a masked copy")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after the search")
    parser.add_argument("--checkpoint-folder", metavar="DIR",
                        help="resumable search state, tensorboardX curves, compressed.pkl and search_result.json")
    parser.add_argument("-o", "--output", help="save the compressed network (.pkl, .json or .vnmodel)")
    parser.add_argument("--verbose", action="store_true", help="progress bars")
    parser.set_defaults(run=search_command)


def search_command(args: argparse.Namespace) -> int:
    """Run the search, print the per-group ratios and before/after MACs and accuracy, save when asked."""
    import compressors.tuners as tuners
    from amc.cli import check_network_output
    from amc.compress_command import original_network
    from compressors.base import top1_accuracy
    from graph.pruning import multiply_adds
    from graph.serialization import save
    from trainers.datasets import load_dataset

    check_network_output(args.output)
    if args.episodes < 1:
        raise ValueError(f"--episodes must be positive, got {args.episodes}")
    data = load_dataset(args.data, batch_size=args.batch_size, train_limit=args.train_limit)
    original = original_network(args, data)
    options: dict[str, Any] = dict(
        compressor=args.compressor, episodes=args.episodes, seed=args.seed or 0,
        checkpointfolder=args.checkpoint_folder, verbose=args.verbose, latency_target=args.latency_target,
        round_to=args.round_to, lbound=args.lbound, reward=args.reward, heldout_images=args.heldout_images,
        calibration_images=args.calibration_images, evaluation=args.evaluation)
    if args.tuner == "ddpg":
        options["warmup"] = args.warmup if args.warmup is not None else max(1, args.episodes // 3)
    if args.tuner == "ga":
        options["population"] = args.population
    tuner_class = getattr(tuners, TUNERS[args.tuner])
    if args.accuracy_threshold is not None:
        from compressors.tuners.accuracy_first import accuracy_first_search

        del options["latency_target"]
        result = accuracy_first_search(tuner_class, original, data.train, data.val, args.accuracy_threshold,
                                       **options)
    else:
        result = tuner_class(original, data.train, data.val, flops_target=args.flops_target, **options).search()
    print(result)
    compressed = result.compressed_net
    rows = [("MACs", f"{multiply_adds(original):,}", f"{result.macs:,}", f"{result.macs_ratio:.3f}"),
            ("held-out top-1", f"{result.original_accuracy:.4f}", f"{result.accuracy:.4f}", ""),
            ("test top-1", f"{top1_accuracy(original, data.test):.4f}", f"{top1_accuracy(compressed, data.test):.4f}",
             "")]
    if args.finetune_epochs > 0:
        from trainers.finetune import finetune

        finetune(compressed, data.train, data.val, epochs=args.finetune_epochs, teacher=original,
                 verbose=args.verbose)
        rows.append(("test top-1 fine-tuned", "", f"{top1_accuracy(compressed.eval(), data.test):.4f}", ""))
    print(f"{'':22s} {'original':>14s} {'compressed':>14s} {'ratio':>7s}")
    for label, old, new, ratio in rows:
        print(f"{label:22s} {old:>14s} {new:>14s} {ratio:>7s}")
    if args.output:
        print(f"saved to {save(compressed, args.output)}")
    else:
        print("not saved: give -o PATH (.pkl, .json or .vnmodel) to keep the compressed network")
    return 0
