"""`tierfl aggregator`: run the federated aggregator service against an MQTT broker."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from aggregator.coordinator_service import CoordinatorService
from aggregator.downlink import DEFAULT_TOLERANCE, DEFAULT_VERSIONS, DOWNLINK_MODES, FULL_COPIES
from aggregator.engines.base import Engine, EngineConfig
from aggregator.engines.buffered import BufferConfig, BufferedEngine
from aggregator.engines.coordinated import CoordinatedEngine
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.engines.secure import SecureRoundEngine
from aggregator.evaluate import HeldOutEvaluator
from aggregator.options import (DEFAULT_FEDPROX_MU, AlgorithmSettings, ExportPlan, add_integrity_arguments,
                                add_personalization_arguments, add_privacy_arguments, add_robust_arguments,
                                add_scaffold_arguments, add_secure_arguments, add_server_optimizer_arguments,
                                proximal_mu, resolve_options)
from aggregator.registry import DeviceRegistry
from aggregator.service import AggregatorService
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.round_spool import SpoolError
from aggregator.store.state import (EXIT_NEEDS_OPERATOR, OptionValue, StateCorrupt, StateMismatch, StateStore,
                                    set_aside, write_run_options)
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedmut import FedMut
from aggregator.strategies.robust import DEFAULT_TRIM_FRACTION
from aggregator.strategies.sampling import SAMPLERS
from aggregator.strategies.tiering import TIER_POLICIES, TierPolicy, make_tier_policy, parse_tier_mix
from aggregator.worker_cli import add_worker_arguments, check_worker_options, load_workers, serve_worker
from models.data import load_dataset
from models.export import export_all
from models.personal import personal_names
from models.spec import ARCH_DEFAULTS, INITS
from protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from protocol.mqtt.embedded_broker import EmbeddedBroker
from protocol.mqtt.url import mask_password
from protocol.mqtt.url import parse as parse_broker
from protocol.signing import AGGREGATOR_KEY_FILE, DeviceKey, EnrolledKeys, SignatureCheck

log = logging.getLogger(__name__)
EXIT_USAGE = 2  # options that do not combine, like argparse's exit status for a bad flag
STRATEGIES = ("fedavg", "fedprox", "fedmut", "fedbuff", "scaffold")

EPILOG = """examples:
  # against Mosquitto, waiting for 4 devices, 20 rounds of FedAvg with C=0.5, E=2, B=16:
  tierfl aggregator --broker mqtt://127.0.0.1:1883 --fleet lab --min-clients 4 \\
      --fraction 0.5 --epochs 2 --batch-size 16 --rounds 20 --state-dir runs/lab

  # HeteroFL: export tiers a, c and e; each device gets the widest tier that fits the deadline:
  tierfl aggregator --broker mqtt://127.0.0.1:1883 --tiers a,c,e --tier-policy auto --round-timeout 60

  # restart with the same --state-dir to resume from the last committed round.

  # a state file that does not check out stops the start (exit status 2, one line naming the file);
  # roll back to the newest kept version that verifies, then start again:
  tierfl aggregator --recover --state-dir runs/lab --fleet lab
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl aggregator` options to `parser`."""
    parser.description = (
        "Run the aggregator: wait for devices, run synchronous FedAvg rounds (select a fraction C of "
        "the available devices, send each its tier's weights, collect updates until all answered or "
        "the deadline passed, average them weighted by samples), evaluate and commit every version "
        "atomically to --state-dir. Without --broker an embedded broker starts on a free port."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    net = parser.add_argument_group("network")
    net.add_argument("--broker", help="mqtt://[user:pass@]host[:port]; default: start an embedded broker")
    net.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default: %(default)s)")
    net.add_argument("--id", dest="aggregator_id", default="aggregator", help="sender id of this aggregator (default: %(default)s)")
    net.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                     help="frames larger than this travel in chunks, reassembled and checked against the frame's sha256 (default: %(default)s)")
    net.add_argument("--downlink", choices=DOWNLINK_MODES, default="int8-delta",
                     help="encoding of the weights sent with each task: int8-delta (int8 of the change from "
                          "whichever of the last --downlink-versions versions the device holds, a --downlink-full "
                          "copy otherwise; about 4x fewer bytes than float32), float16, or float32 (exact); devices "
                          "train from exactly what they decoded (default: %(default)s)")
    net.add_argument("--downlink-versions", type=int, default=DEFAULT_VERSIONS, metavar="K",
                     help="int8-delta: versions kept per tier to send deltas from; memory K x the tier's weights in "
                          "float32 (default: %(default)s)")
    net.add_argument("--downlink-tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="T",
                     help="int8-delta: how far a device's weights may drift from the aggregator's after deltas from "
                          "older versions, as a fraction of the tier's largest weight, before it gets a full copy "
                          "(default: 1/127, one int8 quantum of the tier's largest weight)")
    net.add_argument("--downlink-full", choices=FULL_COPIES, default="float16",
                     help="int8-delta: the full copy for a device that holds none of the kept versions: float16 "
                          "(relative error at most 2^-11) or int8-row (1 byte a weight, error below max|row| / 127) "
                          "(default: %(default)s)")
    net.add_argument("--enrolled", type=Path,
                     help="JSON file of device id -> Ed25519 public key (from `tierfl client --show-key`): only these "
                          "devices are accepted, and every frame must carry its device's signature "
                          "(default: an open fleet, unsigned frames accepted)")
    net.add_argument("--show-key", action="store_true",
                     help="print this aggregator's Ed25519 public key as JSON ({\"aggregator\": HEX}; the key is "
                          "STATE_DIR/aggregator.key, made on first use) and exit: give it to devices as "
                          "`tierfl client --aggregator-key`, so they act only on frames it signed")
    net.add_argument("--max-devices", type=int, default=10_000,
                     help="devices the registry holds; when full, a new device evicts the longest-unseen one that "
                          "never trained, or is refused as rate_limited (default: %(default)s)")
    status = parser.add_argument_group("monitoring")
    status.add_argument("--status-port", type=int, metavar="PORT",
                        help="serve the live status page (/), its data (/status.json), Prometheus metrics "
                             "(/metrics) and operators' analytics queries (tierfl analytics: POST /analytics with the "
                             "token in STATE_DIR/analytics.token)"
                             " over HTTP on this port; 0 picks a free port (the URL is logged) "
                             "(default: off)")
    status.add_argument("--status-host", default="127.0.0.1",
                        help="address the status page binds; 0.0.0.0 exposes it to the network, unauthenticated "
                             "(default: %(default)s)")
    status.add_argument("--linger", type=float, default=0.0, metavar="S",
                        help="keep the status page up for S seconds after the last round, to look at a short run "
                             "(default: %(default)s)")
    model = parser.add_argument_group("model and state")
    model.add_argument("--state-dir", type=Path, default=Path("runs/aggregator"), help="durable state (default: %(default)s)")
    model.add_argument("--recover", action="store_true",
                       help="roll STATE_DIR back to the newest kept version that verifies (state.json, state.prev.json, "
                            "the last 3 weights files), set aside an open round that no longer fits and a ledger that "
                            f"does not open, log what was done, and exit; a start that finds the state corrupt exits "
                            f"{EXIT_NEEDS_OPERATOR} naming the file")
    model.add_argument("--artifacts", type=Path, help="export folder from `tierfl export` (default: STATE_DIR/artifacts, exported on first start)")
    model.add_argument("--arch", choices=list(ARCH_DEFAULTS), default="mlp",
                       help="zoo model to export when no --artifacts (default: %(default)s; your own model: "
                            "`tierfl export --model FILE.onnx --out DIR`, then --artifacts DIR)")
    model.add_argument("--image-size", type=int, choices=[8, 28, 32], default=None,
                       help="input side of an image model (default: the arch's: 8 for mlp/cnn, 32 for preresnet/mobilenet)")
    model.add_argument("--init", choices=list(INITS), default="pytorch",
                       help="how the exported mlp or cnn draws its initial weights: pytorch (PyTorch's default) or "
                            "kaiming (He et al., for the layers a ReLU follows), as `tierfl export --init` "
                            "(default: %(default)s)")
    model.add_argument("--tiers", default="a", help="tiers to export when no --artifacts, e.g. a,b,c (default: %(default)s)")
    tiers = parser.add_argument_group("device tiers (HeteroFL)")
    tiers.add_argument("--tier-policy", choices=TIER_POLICIES, default="fixed",
                       help="fixed: a device keeps one tier (a seeded draw from the mix); dynamic: drawn again every "
                            "round; auto: the widest tier whose E epochs fit in 70%% of --round-timeout, from the "
                            "device's announced or measured speed. A tier the device asks for always wins "
                            "(default: %(default)s)")
    tiers.add_argument("--tier-mix", help="tier shares as HeteroFL writes them: a2-e8 (20%% a, 80%% e), a-b-c (equal) "
                       "(default: every exported tier, equal shares)")
    tiers.add_argument("--aggregation", choices=["weighted", "unweighted"], default="weighted",
                       help="mean of each element over the devices holding it: weighted by samples, or HeteroFL's "
                            "plain mean (default: %(default)s)")
    tiers.add_argument("--bn-statistics", choices=["devices", "averaged"], default="devices",
                       help="batch-norm models: after each round the devices measure the new model's statistics on "
                            "their data and the aggregator pools them per tier (static BN, HeteroFL), or keep the "
                            "running averages left by training, averaged like weights (default: %(default)s)")
    tiers.add_argument("--mask-classes", action="store_true",
                       help="devices leave the classes they have no data for out of their softmax (HeteroFL's "
                            "masking for label-split non-IID data)")
    model.add_argument("--eval-data", help="held-out set for global accuracy: digits | fashion-mnist:test | FILE.npz "
                       "(x of the model's input shape, as `tierfl client --data`; default: federated evaluation on "
                       "the devices' local test splits)")
    rounds = parser.add_argument_group("rounds (FedAvg)")
    rounds.add_argument("--rounds", type=int, default=20, help="total rounds, counting rounds done before a restart (default: %(default)s)")
    rounds.add_argument("--min-clients", type=int, default=2, help="devices that must be available before a round starts (default: %(default)s)")
    rounds.add_argument("--fraction", type=float, default=1.0, help="C: fraction of available devices selected per round (default: %(default)s)")
    rounds.add_argument("--min-updates", type=int, default=1, help="updates needed to commit a round (default: %(default)s)")
    rounds.add_argument("--epochs", type=int, default=1, help="E: local epochs per round (default: %(default)s)")
    rounds.add_argument("--batch-size", type=int, default=32, help="B: local mini-batch size (default: %(default)s)")
    rounds.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (default: %(default)s)")
    rounds.add_argument("--round-timeout", type=float, default=60.0, help="seconds a round waits for updates (default: %(default)s)")
    rounds.add_argument("--seed", type=int, default=0, help="seed of client sampling and local shuffling (default: %(default)s)")
    rounds.add_argument("--mu", type=float,
                        help="FedProx: devices add mu/2 ||w - w_global||^2 to their loss (needs artifacts exported "
                             "with the proximal term, which the aggregator does itself when it exports) "
                             f"(default: {DEFAULT_FEDPROX_MU} with --strategy fedprox, else 0)")
    rounds.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                        help="devices train with logit adjustment against label skew: each adds TAU x log of its own "
                             "label shares to the logits in its loss (classes it lacks are left out), so the shared "
                             "classifier learns class-balanced logits instead of each device's prior; evaluation and "
                             "inference use the plain logits (Menon et al. 2021; FedLC). 1 is the usual value, 0 is "
                             "off (default: %(default)s)")
    add_algorithm_arguments(parser)
    add_robust_arguments(parser)
    add_integrity_arguments(parser)
    add_privacy_arguments(parser)
    add_secure_arguments(parser)
    add_server_optimizer_arguments(parser)
    add_worker_arguments(parser)
    add_personalization_arguments(parser)
    add_scaffold_arguments(parser)


def add_algorithm_arguments(parser: argparse.ArgumentParser) -> None:
    """The --strategy choice, client sampling, and the options of FedMut and FedBuff."""
    group = parser.add_argument_group("algorithm")
    group.add_argument("--strategy", choices=STRATEGIES, default="fedavg",
                       help="fedavg: synchronous rounds, the selected devices' updates averaged; fedprox: fedavg with "
                            "the proximal term (--mu); fedmut: each selected device trains its own mutation of the "
                            "global model, w + alpha * (+/-) (w - w_previous), signs balanced in pairs; fedbuff: no "
                            "rounds, devices train whenever idle and every --buffer-size updates make a new version, "
                            "each weighted by its staleness; --rounds then counts versions; scaffold: fedavg with "
                            "control variates against client drift (see SCAFFOLD below) (default: %(default)s)")
    group.add_argument("--sampling", choices=SAMPLERS, default="uniform",
                       help="which C of the available devices train a round: uniform (seeded draw); availability "
                            "(weighted by each device's record of answering, devices that missed 2 tasks in a row sit "
                            "out 5 rounds); loss (power-of-choice: d = --candidates x C*K devices drawn by data size, "
                            "the highest last training losses win) (default: %(default)s)")
    group.add_argument("--candidates", type=float, default=2.0, help="power-of-choice: candidates per selected device (default: %(default)s)")
    group.add_argument("--fedmut-alpha", type=float, default=1.0, help="FedMut: mutation radius alpha (default: %(default)s)")
    group.add_argument("--fedmut-bias", type=float, default=0.5,
                       help="FedMut: early lean of each pair's second sign toward the update direction, -1 + bias "
                            "(default: %(default)s)")
    group.add_argument("--fedmut-bias-rounds", type=int, default=50, help="FedMut: rounds over which the bias decays to 0 (default: %(default)s)")
    group.add_argument("--weigh-partial-work", action="store_true",
                       help="a device that stopped at the deadline with fewer local steps than asked counts in "
                            "proportion to the steps it did (default: every answer counts by its samples)")
    group.add_argument("--buffer-size", type=int, default=10, help="FedBuff: updates per new version, K (default: %(default)s)")
    group.add_argument("--max-staleness", type=int, default=10,
                       help="FedBuff: refuse updates trained on a version older than this many versions (default: %(default)s)")
    group.add_argument("--staleness-exponent", type=float, default=0.5,
                       help="FedBuff: an update tau versions stale counts (1 + tau) ** -exponent (default: %(default)s, 1/sqrt(1 + tau))")
    group.add_argument("--concurrency", type=int, help="FedBuff: most devices training at once (default: every idle device)")


def make_strategy(args: argparse.Namespace, policy: TierPolicy, settings: AlgorithmSettings) -> FedAvg:
    """The --strategy with its options, the resolved sampler and accumulator, and the tier policy."""
    options = dict(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, tiers=policy,
        weighted=args.aggregation == "weighted", mask_classes=args.mask_classes, proximal_mu=settings.proximal_mu,
        logit_adjust=args.logit_adjust,
        seed=args.seed, sampler=settings.sampler, accumulator=settings.accumulator,
        weigh_partial_work=args.weigh_partial_work,
    )
    if args.strategy == "fedmut":
        return FedMut(alpha=args.fedmut_alpha, bias=args.fedmut_bias, bias_rounds=args.fedmut_bias_rounds, **options)
    return FedAvg(**options)


def derived_defaults(args: argparse.Namespace) -> dict[str, object]:
    """Values a start uses for options left unset that follow from other options (`tierfl config show`)."""
    return {"mu": proximal_mu(args), "trim_fraction": DEFAULT_TRIM_FRACTION, "artifacts": args.state_dir / "artifacts"}


def open_artifacts(args: argparse.Namespace, export: ExportPlan | None) -> ArtifactStore:
    """The export named by --artifacts, or STATE_DIR/artifacts, exported now as planned if it is not there yet."""
    if export is not None and export.recipe is not None:
        log.info("exporting %s tiers %s to %s", export.card.name, ",".join(export.tiers), export.folder)
        export_all(export.recipe, list(export.tiers), export.folder, proximal=export.proximal)
    return ArtifactStore(args.artifacts or args.state_dir / "artifacts")


def resolved_personal_layers(settings: AlgorithmSettings, artifacts: ArtifactStore) -> tuple[str, ...]:
    """--personal-layers resolved against the open export's parameter names (ValueError naming what it has)."""
    patterns = settings.personalization.personal_layers
    return personal_names(patterns, list(next(iter(artifacts.tiers.values())).shapes)) if patterns else ()


def recover(state_dir: Path, fleet: str, identity: str) -> int:
    """`--recover`: roll the state back to the newest version that verifies, set aside a ledger that does not open; 0."""
    record = StateStore(state_dir).recover(fleet, identity)
    path = state_dir / "ledger.sqlite"
    try:
        Ledger(path).close()
    except StateCorrupt as exc:
        log.warning("recover: %s; set aside as %s, a new ledger starts (updates accepted before are no longer "
                    "recognised as duplicates; their rounds are finished, so a replay is refused as late)",
                    exc, set_aside(path))
    if record is not None:
        log.info("recover: %s is at version %d after round %d; start the aggregator as usual", state_dir,
                 record.version, record.round)
    return 0


def run_options(args: argparse.Namespace) -> dict[str, OptionValue]:
    """The parsed options as plain JSON values for options.json, the broker URL's password masked."""
    def plain(value: object) -> OptionValue:
        if isinstance(value, (list, tuple)):
            return [str(item) for item in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return mask_password(str(value))
    return {name: plain(value) for name, value in sorted(vars(args).items()) if not callable(value)}


def run(args: argparse.Namespace) -> int:
    """Serve rounds until --rounds are done or SIGINT/SIGTERM; 0 when done, 2 on options that do not combine or
    when the state needs an operator."""
    try:
        settings = resolve_options(args)
        check_worker_options(args)
    except ValueError as exc:  # like argparse on a bad flag: nothing was written
        print(f"tierfl aggregator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return serve(args, settings)
    except (StateCorrupt, StateMismatch, SpoolError) as exc:
        log.error("%s", exc)
        return EXIT_NEEDS_OPERATOR


def serve(args: argparse.Namespace, settings: AlgorithmSettings) -> int:
    """Serve rounds until --rounds are done or SIGINT/SIGTERM (or, with --recover, repair the state); 0 when done."""
    key = DeviceKey(args.state_dir, AGGREGATOR_KEY_FILE)  # signs every frame we send
    if args.show_key:
        print(json.dumps({"aggregator": key.public_hex}))
        return 0
    artifacts = open_artifacts(args, settings.export)
    if args.worker_of:
        return serve_worker(args, key, artifacts)
    if args.recover:
        return recover(args.state_dir, args.fleet, artifacts.identity)
    write_run_options(args.state_dir, run_options(args))
    config = EngineConfig(
        fleet=args.fleet, rounds=args.rounds, min_updates=args.min_updates,
        round_timeout_s=args.round_timeout, bn_statistics=args.bn_statistics, seed=args.seed,
        outlier_multiple=args.outlier_multiple, max_share=args.max_share,
        server_optimizer=settings.server_optimizer, scaffold=settings.scaffold,
        finetune_steps=settings.personalization.finetune_steps,
        personal_layers=resolved_personal_layers(settings, artifacts),
    )
    mix = settings.tier_mix or parse_tier_mix("-".join(artifacts.tiers))
    policy = make_tier_policy(args.tier_policy, mix, artifacts.macs, args.epochs, args.round_timeout, args.seed)
    dp, secure = settings.dp, settings.secure
    strategy = make_strategy(args, policy, settings)
    privacy = dp.budget()
    if dp.mode == "local":
        config = config.model_copy(update={"local_dp_clip": dp.clip_norm, "local_dp_noise": dp.noise_multiplier})
    evaluator = None
    if args.eval_data:  # fitted to the model's input here: a mismatch stops the start, naming the data
        evaluator = HeldOutEvaluator(load_dataset(args.eval_data), artifacts, source=args.eval_data)
    ledger = Ledger(args.state_dir / "ledger.sqlite")
    with contextlib.closing(ledger):  # closed on every way out: no -wal and -shm files left behind
        store = StateStore(args.state_dir)
        ledger.group_commit(store.open_round)  # acceptances synced in batches (aggregator.store.ledger)
        parts = EngineParts(config, strategy, artifacts, store, DeviceRegistry(max_devices=args.max_devices),
                            evaluator, ledger, privacy)
        if args.strategy == "fedbuff":
            buffer = BufferConfig(buffer_size=args.buffer_size, max_staleness=args.max_staleness,
                                  staleness_exponent=args.staleness_exponent, concurrency=args.concurrency,
                                  min_clients=args.min_clients)
            engine: Engine = BufferedEngine(parts, buffer)
        elif secure is not None:  # with --enrolled, advertisements that do not verify are refused at the aggregator too
            engine = SecureRoundEngine(parts, secure, enrolled=EnrolledKeys.load(args.enrolled).root if args.enrolled else None)
        elif args.workers:
            engine = CoordinatedEngine(parts, args.flush_wait)
        else:
            engine = RoundEngine(parts)
        if engine.finished:
            log.info("all %d rounds are already done in %s (version %d)", config.rounds, args.state_dir, engine.record.version)
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        with contextlib.ExitStack() as stack:
            if args.broker:
                broker = parse_broker(args.broker)
            else:
                embedded = stack.enter_context(EmbeddedBroker())
                broker = parse_broker(embedded.url)
                log.info("embedded broker listening at %s: start devices with `tierfl client --broker %s ...`", embedded.url, embedded.url)
            monitor, analytics = None, None
            if args.status_port is not None:
                from aggregator.analytics import AnalyticsDesk, analytics_token, tier_weights_of
                from aggregator.monitor import Monitor  # prometheus-client: only when the status page is on

                monitor = stack.enter_context(Monitor(args.status_host, args.status_port,
                                                      analytics_token=analytics_token(args.state_dir)))
                analytics = AnalyticsDesk(engine.registry, engine.artifacts, tier_weights_of(engine),
                                          engine.count_rejection, folder=args.state_dir)
            service_class = AggregatorService
            extra: dict[str, object] = {}
            if isinstance(engine, CoordinatedEngine):
                service_class, extra = CoordinatorService, {"workers": load_workers(args.workers)}
            service = service_class(engine, broker, aggregator_id=args.aggregator_id, **extra,  # type: ignore[arg-type]
                                       max_message_bytes=args.max_message_bytes, downlink=args.downlink,
                                       downlink_versions=args.downlink_versions, downlink_tolerance=args.downlink_tolerance,
                                       downlink_full=args.downlink_full,
                                       signatures=SignatureCheck(EnrolledKeys.load(args.enrolled).root) if args.enrolled else None,
                                       monitor=monitor, key=key, analytics=analytics)
            service.run(stop)
            if monitor is not None and args.linger > 0 and not stop.is_set():
                log.info("all rounds done; the status page stays up at %s for %.0f s (--linger)", monitor.url, args.linger)
                stop.wait(args.linger)
        log.info("stopped after round %d at version %d; rejected: %s; ledger %s: %s", engine.record.round,
                 engine.record.version, dict(engine.rejected) or "none", ledger.path, ledger.counts())
        return 0
