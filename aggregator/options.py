"""The aggregator's command-line options of algorithms, and the typed settings they become.

Domain modules (strategies, engines) take typed settings; this module owns the argparse groups
of robust aggregation, weight integrity, differential privacy, secure aggregation and the server
optimizer, turns the parsed options into those settings, and says which options do not combine,
the model and tiers of the export included (read from an existing export, or the one a start
will write), all before anything is exported or written.
"""

from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass
from pathlib import Path

from aggregator.downlink import check_int8_delta
from aggregator.engines.secure import SecureConfig
from aggregator.strategies.fedavg import AccumulatorFactory, check_logit_adjust
from aggregator.strategies.privacy import DEFAULT_DELTA, DP_MODES, DpSettings
from aggregator.strategies.robust import (DEFAULT_OUTLIER_MULTIPLE, DEFAULT_TRIM_FRACTION, MIN_KNOWN_NORMS, NORM_WINDOW,
                                          ROBUST_MODES, robust_accumulator)
from aggregator.strategies.sampling import ClientSampler, make_sampler
from aggregator.strategies.scaffold import Scaffold
from aggregator.strategies.server_optimizer import ADAPTIVE, SERVER_OPTIMIZERS, ServerOptimizer
from aggregator.strategies.tiering import parse_tier_mix
from models.export import zoo_card
from models.manifest import ExportIndex, ModelCard, TierManifest
from models.personal import personal_names
from models.spec import ModelSpec
from models.tiers import tier_rate
from models.zoo import init_global_params
from protocol.messages import MAX_FINETUNE_STEPS

DEFAULT_FEDPROX_MU = 0.01


def add_robust_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--robust`, `--clip-norm` and `--trim-fraction` options of `tierfl aggregator`."""
    group = parser.add_argument_group("robust aggregation (against faulty or malicious updates)")
    group.add_argument("--robust", choices=ROBUST_MODES, default="none",
                       help="none: the mean of --aggregation; clip: every update's delta scaled to L2 norm at most "
                            "--clip-norm, then that mean; median: coordinate-wise median of the deltas; trimmed-mean: "
                            "coordinate-wise mean without the --trim-fraction lowest and highest values. Median and "
                            "trimmed mean count each device once (no sample weighting) and keep the round's updates in "
                            "memory (O(updates x model)); each element is combined over the devices whose tier holds "
                            "it (default: %(default)s)")
    group.add_argument("--clip-norm", type=float, metavar="C",
                       help="--robust clip: fixed bound on each update's L2 norm (streams, memory O(model)); "
                            "default: adaptive, the median norm of the round's updates (keeps them in memory)")
    group.add_argument("--trim-fraction", type=float, metavar="BETA",
                       help=f"--robust trimmed-mean: fraction in [0, 0.5) dropped from each side of every element "
                            f"(default: {DEFAULT_TRIM_FRACTION})")


def add_integrity_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--outlier-multiple` and `--max-share` options (bounds on any one update, whatever the accumulator)."""
    group = parser.add_argument_group("weight integrity (bounds on any one update)")
    group.add_argument("--outlier-multiple", type=float, default=DEFAULT_OUTLIER_MULTIPLE, metavar="M",
                       help=f"refuse (outlier) an update whose L2 norm is over M x the median norm of the last "
                            f"{NORM_WINDOW} accepted updates of its tier, once {MIN_KNOWN_NORMS} are known; 0: only "
                            f"NaN/Inf is refused (default: %(default)s)")
    group.add_argument("--max-share", type=float, default=1.0, metavar="F",
                       help="cap on one device's share of a round's weight, in (0, 1]: on every element it holds with "
                            "other selected devices, its weight is at most F of the announced samples of the selected "
                            "devices holding that element (HeteroFL: those of its tier or wider); synchronous rounds "
                            "only (default: %(default)s, no cap)")


def accumulator_from_args(args: argparse.Namespace, weighted: bool = True) -> AccumulatorFactory:
    """The accumulator factory chosen by the options of `add_robust_arguments`."""
    return robust_accumulator(args.robust, args.clip_norm, args.trim_fraction, weighted)


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--dp`, `--dp-clip`, `--dp-noise`, `--dp-delta` and `--dp-seed` options of `tierfl aggregator`."""
    group = parser.add_argument_group(
        "differential privacy (DP-FedAvg, user-level)",
        "Each device's update is clipped to L2 norm --dp-clip and Gaussian noise of std --dp-noise x --dp-clip "
        "is added; after every round the summary reports the (epsilon, delta)-DP spent so far per device "
        "(Renyi-DP accounting). Only the weight updates are protected: sample counts, losses and accuracies "
        "are not, and neither are batch-norm statistics (use --bn-statistics averaged with batch-norm models).")
    group.add_argument("--dp", choices=DP_MODES, default="off",
                       help="central: the aggregator clips, sums with one vote per device, adds noise once to the "
                            "sum and divides by the number of updates holding each element (devices trust the "
                            "aggregator; replaces --aggregation and --robust); local: every device clips and noises "
                            "its own update before sending it (trusts no one, needs far more devices for the same "
                            "accuracy; no privacy gain from sampling). Default: %(default)s")
    group.add_argument("--dp-clip", type=float, metavar="C",
                       help="bound on the L2 norm of each update's delta, all tensors together; set it near the "
                            "median update norm of a non-private run")
    group.add_argument("--dp-noise", type=float, metavar="Z",
                       help="noise multiplier z: the noise std on the sum is z x C, on the mean z x C / n with n "
                            "updates; around 1 gives single-digit epsilon over hundreds of rounds at low sampling "
                            "rates")
    group.add_argument("--dp-delta", type=float, default=DEFAULT_DELTA, metavar="DELTA",
                       help="the delta of the (epsilon, delta) reported; keep it below 1 / number of devices "
                            "(default: %(default)s)")
    group.add_argument("--dp-seed", type=int, metavar="N",
                       help="--dp central: seed of the aggregator's noise, which must stay secret (anyone who knows it "
                            "and the global model can remove the noise); give it to reproduce a run "
                            "(default: fresh from the OS at start)")


def privacy_from_args(args: argparse.Namespace) -> DpSettings:
    """The checked settings of the options of `add_privacy_arguments` (ValueError on a bad combination)."""
    if args.dp == "central" and getattr(args, "robust", "none") != "none":
        raise ValueError(f"--dp central does its own clipping and mean; it cannot be combined with --robust {args.robust}")
    if args.dp_seed is not None and args.dp != "central":
        raise ValueError("--dp-seed seeds the aggregator's noise: it applies to --dp central only")
    seed = args.dp_seed if args.dp_seed is not None else secrets.randbits(64)
    return DpSettings(args.dp, args.dp_clip, args.dp_noise, args.dp_delta, seed)


def add_secure_arguments(parser: argparse.ArgumentParser) -> None:
    """The --secure-aggregation options."""
    group = parser.add_argument_group("secure aggregation (the aggregator sees only masked updates)")
    group.add_argument("--secure-aggregation", action="store_true",
                       help="sum every round by secure aggregation (Bonawitz et al.): devices mask their weighted "
                            "updates with pairwise and self masks that cancel in the sum, secret-share the mask seeds "
                            "so the sum survives devices dropping out, and the aggregator unmasks only the sum. Not "
                            "with --strategy fedmut/fedbuff, --robust, --dp central, --weigh-partial-work, or "
                            "batch-norm statistics measured on devices; costs a few extra messages per round")
    group.add_argument("--secagg-threshold", type=float, default=2 / 3, metavar="FRACTION",
                       help="share of the selected devices (rounded up, at least 2) whose answers a round needs "
                            "to the end: the threshold t of the secret sharing; up to t - 1 colluding devices learn "
                            "nothing from it (default: 2/3)")
    group.add_argument("--secagg-clip", type=float, default=16.0, metavar="C",
                       help="bound on |weight x update| per element, weight = the device's samples over the mean; "
                            "devices clip to it (default: %(default)s)")
    group.add_argument("--secagg-ring-bits", type=int, choices=[32, 64], default=32,
                       help="masked integers' width: 32 costs what a float32 update does, 64 twice that for "
                            "huge fleets or clips (default: %(default)s)")


def secure_from_args(args: argparse.Namespace) -> SecureConfig | None:
    """The checked settings of `add_secure_arguments`, or None without --secure-aggregation (ValueError on a bad combination)."""
    if not args.secure_aggregation:
        return None
    conflicts = {
        f"--strategy {args.strategy}": args.strategy in ("fedmut", "fedbuff"),
        f"--robust {args.robust}": args.robust != "none",
        "--dp central": args.dp == "central",
        "--weigh-partial-work": args.weigh_partial_work,
    }
    if clash := [option for option, present in conflicts.items() if present]:
        raise ValueError(f"--secure-aggregation cannot be combined with {', '.join(clash)}: the aggregator never "
                         "sees individual updates (fedbuff has no rounds to mask; --dp local works)")
    if args.min_clients < 2:
        raise ValueError("--secure-aggregation needs --min-clients 2 or more: the sum of one device is its update")
    return SecureConfig(threshold_fraction=args.secagg_threshold, clip=args.secagg_clip, ring_bits=args.secagg_ring_bits)


def proximal_mu(args: argparse.Namespace) -> float:
    """--mu, or FedProx's default with --strategy fedprox."""
    if args.mu is not None:
        if args.strategy == "fedprox" and args.mu <= 0:
            raise ValueError("--strategy fedprox needs --mu > 0")
        return args.mu
    return DEFAULT_FEDPROX_MU if args.strategy == "fedprox" else 0.0


@dataclass(frozen=True)
class ExportPlan:
    """The export a start serves, known before anything is exported: an existing folder's, or the one it will write."""

    folder: Path
    card: ModelCard
    tiers: tuple[str, ...]
    proximal: bool  # every tier's graphs carry FedProx's proximal term
    recipe: ModelSpec | None = None  # the zoo model the start exports into `folder` (STATE_DIR/artifacts); None: exists
    parameters: tuple[str, ...] = ()  # the model's parameter names
    optimizers: frozenset[str] = frozenset()  # an existing export's tiers' optimizers (a planned one trains with SGD)

    @property
    def exists(self) -> bool:
        """True when `folder` holds the export already; False when the start exports `recipe` into it."""
        return self.recipe is None


def planned_export(args: argparse.Namespace, mu: float) -> ExportPlan | None:
    """The export --artifacts names, else STATE_DIR/artifacts as it is or as a start will export it (--arch,
    --image-size, --tiers, the proximal term when `mu` > 0); None when it cannot be read here (the start says why)."""
    folder: Path = args.artifacts or args.state_dir / "artifacts"
    index_path = folder / "index.json"
    if index_path.is_file():
        try:
            index = ExportIndex.load(index_path)
            manifests = [TierManifest.load(folder / rel) for rel in index.tiers.values()]
        except (OSError, ValueError):  # a damaged export: opening it at the start names the file
            return None
        return ExportPlan(folder, index.model, tuple(index.tiers), all(m.proximal for m in manifests),
                          parameters=tuple(p.name for p in manifests[0].params) if manifests else (),
                          optimizers=frozenset(m.optimizer for m in manifests))
    if args.artifacts is not None:
        return None
    tiers = tuple(dict.fromkeys(t.strip() for t in args.tiers.split(",") if t.strip()))
    if not tiers:
        raise ValueError("--tiers names no tier")
    for tier in tiers:
        tier_rate(tier)
    recipe = ModelSpec(arch=args.arch, init=args.init, **({} if args.image_size is None else {"image_size": args.image_size}))
    return ExportPlan(folder, zoo_card(recipe), tiers, mu > 0, recipe, tuple(init_global_params(recipe)))


def export_problem(args: argparse.Namespace, mu: float, export: ExportPlan) -> str | None:
    """Why the options do not fit the export's model and tiers, or None."""
    if mu > 0 and export.exists and not export.proximal:
        return (f"--mu {mu} needs artifacts with the FedProx term: re-export {export.folder} with "
                "`tierfl export --proximal` (or let the aggregator export them: no --artifacts)")
    if args.dp != "off" and export.card.batch_norm and args.bn_statistics == "devices":
        return (f"--dp needs --bn-statistics averaged: the batch-norm statistics of {export.card.name} measured on "
                "devices are not privatized")
    if args.tier_mix and (missing := sorted(set(parse_tier_mix(args.tier_mix)) - set(export.tiers))):
        return (f"--tier-mix names tiers {', '.join(missing)} that the export lacks (have: {', '.join(export.tiers)}"
                f"{'' if export.exists else ', from --tiers'})")
    return None


@dataclass(frozen=True)
class AlgorithmSettings:
    """What the algorithm options resolve to, checked together once, before anything is exported or started."""

    proximal_mu: float
    sampler: ClientSampler
    dp: DpSettings
    accumulator: AccumulatorFactory  # central DP's, a robust one, or the mean
    secure: SecureConfig | None
    server_optimizer: ServerOptimizer | None
    export: ExportPlan | None  # None: --artifacts names a folder that cannot be read (the start says why)
    tier_mix: dict[str, float] | None  # tier -> share; None: every exported tier, equal shares
    personalization: Personalization
    scaffold: Scaffold | None = None  # --strategy scaffold's settings


def resolve_options(args: argparse.Namespace) -> AlgorithmSettings:
    """The algorithm settings of the parsed options; ValueError saying why when options do not combine, with each
    other or with the export's model and tiers."""
    mu = proximal_mu(args)
    check_logit_adjust(args.logit_adjust)
    check_int8_delta(args.downlink_versions, args.downlink_tolerance, args.downlink_full)  # before anything is written
    if args.strategy == "fedbuff" and args.max_share < 1:
        raise ValueError("--max-share applies to synchronous rounds: FedBuff has no round selection to cap a share of")
    sampler = make_sampler(args.sampling, args.fraction, 1 if args.strategy == "fedbuff" else args.min_clients,
                           args.seed, args.candidates)
    dp = privacy_from_args(args)
    secure = secure_from_args(args)
    server_optimizer = server_optimizer_from_args(args)
    accumulator = dp.accumulator_factory() or accumulator_from_args(args, weighted=args.aggregation == "weighted")
    mix = parse_tier_mix(args.tier_mix) if args.tier_mix else None
    export = planned_export(args, mu)
    if export is not None and (problem := export_problem(args, mu, export)):
        raise ValueError(problem)
    personalization = personalization_from_args(args, export.parameters if export is not None else None)
    return AlgorithmSettings(mu, sampler, dp, accumulator, secure, server_optimizer, export, mix, personalization,
                             scaffold=scaffold_from_args(args, export))


def add_personalization_arguments(parser: argparse.ArgumentParser) -> None:
    """The --personalize and --personal-layers options of `tierfl aggregator`."""
    group = parser.add_argument_group(
        "personalization (one model per device under non-IID data)",
        "Each round's summary, the status page and the report then give the devices' own accuracies, unweighted "
        "across devices: the mean and the mean of the worst 10% of devices.")
    group.add_argument("--personalize", default="off", metavar="finetune:K",
                       help="finetune:K: every device also measures a personalized model: K local steps (batch "
                            "--batch-size, --lr) on its training split from the round's starting weights, the same "
                            "model it evaluates as the global one, then its test split; reported beside the global "
                            "accuracy (acc_finetuned_* beside acc_global_*). Done after the update is taken: the "
                            f"fine-tuned weights are never sent and never change the update. K in 1..{MAX_FINETUNE_STEPS} "
                            "(default: %(default)s)")
    group.add_argument("--personal-layers", metavar="NAME,...",
                       help="FedPer/FedRep: parameters (names or shell patterns: fc3.*) that stay on each device: "
                            "never sent, never aggregated (an update carrying one is refused, bad_tensor); each "
                            "device trains its own copy, starting from the global model's, and keeps it across "
                            "restarts (CACHE_DIR/personal-layers-MODEL.npz). When a device's tier changes, its copy "
                            "keeps the shared leading block and takes the global values where the tier is wider. "
                            "Accuracy then comes from the devices (not with --eval-data), each with its own layers")


@dataclass(frozen=True)
class Personalization:
    """What --personalize and --personal-layers resolve to: the fine-tune's steps (0: off) and the personal layers."""

    finetune_steps: int = 0
    personal_layers: tuple[str, ...] = ()


def personalization_from_args(args: argparse.Namespace, parameters: tuple[str, ...] | None) -> Personalization:
    """The checked settings of `add_personalization_arguments`; the layer patterns resolved against the model's
    `parameters` when known (None: resolved once the export is open). ValueError on a bad value or combination."""
    kind, _, steps = str(args.personalize).partition(":")
    finetune = 0
    if kind != "off" or steps:
        if kind != "finetune" or not steps.isdigit() or not 1 <= int(steps) <= MAX_FINETUNE_STEPS:
            raise ValueError(f"--personalize {args.personalize}: expected finetune:K with K a number of local steps in "
                             f"1..{MAX_FINETUNE_STEPS}, or off")
        finetune = int(steps)
    patterns = [p.strip() for p in (args.personal_layers or "").split(",") if p.strip()]
    if args.personal_layers is not None and not patterns:
        raise ValueError("--personal-layers names no parameter")
    conflicts = {
        "--secure-aggregation": args.secure_aggregation,
        "--dp central (its noise covers every element, personal layers included)": args.dp == "central",
        "--eval-data (the aggregator's copy of the personal layers is never trained; --eval-data '' drops a "
        "config file's)": bool(args.eval_data),
    }
    if patterns and (clash := [option for option, present in conflicts.items() if present]):
        raise ValueError(f"--personal-layers cannot be combined with {', '.join(clash)}")
    if finetune and args.secure_aggregation:
        raise ValueError("--personalize cannot be combined with --secure-aggregation: a masked answer carries no "
                         "personalized accuracy")
    layers = personal_names(patterns, parameters) if patterns and parameters else tuple(patterns)
    return Personalization(finetune, layers)


def add_server_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """The --server-optimizer options of `tierfl aggregator`."""
    group = parser.add_argument_group(
        "server optimizer (Reddi et al.: the round's mean update as a pseudo-gradient)",
        "Every version is x + step(mean update) element by element across tiers; an element no update held "
        "gets no step and keeps its moments. The optimizer's state is committed with each version.")
    group.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default="fedavg",
                       help="fedavg: the mean update itself (no server optimizer); sgd: x + lr x mean; momentum: "
                            "FedAvgM; adam, yogi, adagrad: FedAdam, FedYogi, FedAdagrad (default: %(default)s)")
    group.add_argument("--server-lr", type=float, metavar="ETA",
                       help="server learning rate (default: 1 for sgd and momentum, 0.1 for adam, yogi, adagrad)")
    group.add_argument("--server-beta1", type=float, default=0.9, metavar="B1",
                       help="momentum, and the first moment of adam/yogi/adagrad (default: %(default)s)")
    group.add_argument("--server-beta2", type=float, default=0.99, metavar="B2",
                       help="second moment of adam and yogi (default: %(default)s)")
    group.add_argument("--server-tau", type=float, default=1e-3, metavar="TAU",
                       help="adaptivity of adam/yogi/adagrad: added to sqrt(v); v starts at tau^2 (default: %(default)s)")


def server_optimizer_from_args(args: argparse.Namespace) -> ServerOptimizer | None:
    """The checked server optimizer of `add_server_optimizer_arguments`, or None for plain FedAvg."""
    if args.server_optimizer == "fedavg":
        if args.server_lr is not None:
            raise ValueError("--server-lr needs --server-optimizer sgd|momentum|adam|yogi|adagrad")
        return None
    if args.strategy == "fedmut":
        raise ValueError("--server-optimizer cannot be combined with --strategy fedmut: FedMut makes its own global step "
                         "(its mutations follow it)")
    lr = args.server_lr if args.server_lr is not None else (0.1 if args.server_optimizer in ADAPTIVE else 1.0)
    return ServerOptimizer(args.server_optimizer, lr, args.server_beta1, args.server_beta2, args.server_tau)


def add_scaffold_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `--strategy scaffold` (SCAFFOLD's control variates)."""
    group = parser.add_argument_group(
        "SCAFFOLD (--strategy scaffold: control variates against client drift, Karimireddy et al., option II)",
        "The aggregator keeps a control variate c (zero at first, one tensor per trained parameter) and sends each "
        "selected device its tier's slice of c with the weights, through the same --downlink. Each device keeps its "
        "own c_i per tier (CACHE_DIR/scaffold-<tier>.npz, surviving a restart), corrects every local SGD step by "
        "c - c_i, and sends the update alone: c_i's change, -c - update/(K lr) after K steps, does not depend on c_i, "
        "so the aggregator derives it from each accepted update (an update carrying scaffold/ tensors is refused "
        "bad_tensor). The weights move as with fedavg (or --server-optimizer); c "
        "moves by |S|/N x the mean change over the S devices that answered, element by element across tiers, and is "
        "committed with each version. Works with --fraction < 1, tiers, --server-optimizer, --downlink, update "
        "codecs, --weigh-partial-work and --max-share. Refused with --secure-aggregation (the changes of c_i are "
        "derived from each device's own update, which it hides), --dp (c_i and its correction come from unclipped, "
        "un-noised gradients; a change derived from a noised update carries noise/(K lr)), --robust (c would "
        "take a plain mean of what the weights' robust mean distrusts), --personal-layers (no shared variate for a "
        "personal layer), --workers (their partial sums lose each device's update and step count), --tier-policy dynamic (a device's c_i is "
        "per tier: c would count a device once per tier it drew; with auto a device changes tier rarely) and "
        "artifacts exported with AdamW (the correction is exact for plain SGD); fedprox, fedmut and fedbuff (no rounds, so no |S|/N) are other "
        "strategies; a relay refuses SCAFFOLD tasks.")
    group.add_argument("--scaffold-fleet-size", type=int, metavar="N",
                       help="N, the devices of the fleet, in c's step |S|/N (default: the devices available when each "
                            "round was drawn, kept in the round's plan; never less than the devices that answered)")


def scaffold_from_args(args: argparse.Namespace, export: ExportPlan | None) -> Scaffold | None:
    """The checked settings of `add_scaffold_arguments`, or None without --strategy scaffold (ValueError saying which
    options do not combine with it, and why)."""
    if args.strategy != "scaffold":
        if args.scaffold_fleet_size is not None:
            raise ValueError("--scaffold-fleet-size needs --strategy scaffold")
        return None
    conflicts = {
        "--secure-aggregation (the changes of the devices' control variates are derived from each device's own "
        "update, which it hides)": args.secure_aggregation,
        f"--dp {args.dp} (the devices' control variates come from unclipped, un-noised gradients, and a change "
        "derived from a noised update carries noise / (K lr))": args.dp != "off",
        f"--robust {args.robust} (c would take a plain mean of the updates the robust mean distrusts)": args.robust != "none",
        "--personal-layers (a personal layer has no shared control variate)": bool(getattr(args, "personal_layers", None)),
        "--workers (their partial sums lose each device's update and step count, from which its variate's change is "
        "derived)": bool(getattr(args, "workers", None)),
        "--tier-policy dynamic (a device keeps one c_i per tier it trains, so a device drawing another tier each "
        "round would count in c once per tier)": getattr(args, "tier_policy", "fixed") == "dynamic",
    }
    if clash := [option for option, present in conflicts.items() if present]:
        raise ValueError(f"--strategy scaffold cannot be combined with {'; '.join(clash)}")
    if export is not None and (optimizers := sorted(export.optimizers - {"sgd"})):
        raise ValueError(f"--strategy scaffold needs artifacts trained with plain SGD (its per-step correction is exact "
                         f"for SGD); {export.folder} was exported with {', '.join(optimizers)}")
    return Scaffold(args.scaffold_fleet_size)
