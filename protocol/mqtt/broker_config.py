"""`tierfl broker-config`: a locked-down Mosquitto 2 configuration for one fleet.

TLS with a CA made here, a password per device and one for the aggregator, and an ACL that lets
each device publish only its own `up/` and `status/` topics and read only its own `down/` topic.

The ACL uses Mosquitto's `pattern` lines with `%u` (the MQTT user name) rather than one block per
device: the file stays the same size whatever the fleet, adding a device is one line in the password
file (`mosquitto_passwd passwd NEW-ID`, then SIGHUP the broker), and the identity a device may
publish as is the name it logged in with. The price is one rule: a device's MQTT user name must be
its device id (`tierfl client --device-id ID --broker mqtts://ID:PASSWORD@...`); a device that
logs in as one id and publishes as another is silently dropped by the broker.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import importlib.util
import ipaddress
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic

from protocol.atomic_file import atomic_write
from protocol.mqtt.url import DEFAULT_TLS_PORT
from protocol.mqtt.url import parse as parse_url
from protocol.topics import Topics, check_id

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

AGGREGATOR_USER = "aggregator"
BROKER_USER = "mosquitto"  # the account Mosquitto drops to when started as root
PBKDF2_ITERATIONS = 101  # Mosquitto 2's own default; the passwords are 256-bit random, not guessable
SECRET = 0o600
PUBLIC = 0o644
# Every file the command writes, its permissions, and what it is for (shown by --help).
FILES: dict[str, tuple[int, str]] = {
    "mosquitto.conf": (PUBLIC, "the broker configuration: run `mosquitto -c DIR/mosquitto.conf`"),
    "ca.crt": (PUBLIC, "the fleet's CA certificate: copy it to every device and the aggregator"),
    "ca.key": (SECRET, "the CA's private key: keep it secret; whoever holds it can pose as the broker"),
    "server.crt": (PUBLIC, "the broker's certificate, signed by the CA, for --host, localhost and 127.0.0.1"),
    "server.key": (SECRET, "the broker's private key"),
    "passwd": (SECRET, "Mosquitto password file: salted hashes of the devices' and the aggregator's passwords"),
    "acl": (SECRET, "Mosquitto ACL: which topics each user may publish and receive"),
    "credentials.json": (SECRET, "every user's password and mqtts:// URL: hand each device only its own"),
}


class UserCredentials(pydantic.BaseModel, frozen=True):
    """One MQTT user of the fleet and the broker URL it connects with."""

    username: str
    password: str = pydantic.Field(repr=False)
    url: str = pydantic.Field(repr=False)  # mqtts://USER:PASSWORD@HOST:PORT?ca=CA_FILE


class FleetCredentials(pydantic.BaseModel, frozen=True):
    """credentials.json: the generated passwords of one fleet."""

    fleet: str
    broker: str  # mqtts://HOST:PORT, without a user
    ca_file: str
    aggregator: UserCredentials
    devices: dict[str, UserCredentials]
    workers: dict[str, UserCredentials] = {}  # aggregator workers (tierfl aggregator --worker-of)
    bridges: dict[str, UserCredentials] = {}  # site brokers bridged to this one

    def user(self, name: str) -> UserCredentials:
        """The aggregator's, a worker's, a bridge's or one device's credentials; KeyError for an unknown name."""
        if name == self.aggregator.username:
            return self.aggregator
        return self.workers.get(name) or self.bridges.get(name) or self.devices[name]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FleetCredentials:
        """Read a credentials.json written by `tierfl broker-config`."""
        return cls.model_validate_json(Path(path).read_text())


def acl_text(fleet: str, aggregator_user: str = AGGREGATOR_USER, workers: Sequence[str] = (),
             bridges: Sequence[str] = ()) -> str:
    """The Mosquitto ACL file of a fleet: devices by pattern (%u = user name = device id), the aggregator, its
    workers and the bridges of site brokers by name."""
    topics = Topics(fleet)
    base = topics.base
    blocks = "".join(f"""
# Aggregator worker {worker!r}: its share of the uplink (the shared subscription
# $share/{aggregator_user}/{base}/up/+), the devices' status, and its own topics to the coordinator.
user {worker}
topic read {topics.all_up()}
topic read {topics.all_status}
topic write {topics.worker(worker, "up")}
topic write {topics.worker(worker, "status")}
topic read {topics.worker(worker, "down")}
""" for worker in workers)
    blocks += "".join(f"""
# The bridge of site broker {bridge!r}: it publishes its devices' uplink and status here and carries
# their downlink and the round summaries back (its own broker's ACL binds each device to its topics).
user {bridge}
topic write {base}/up/+
topic write {base}/status/+
topic read {base}/down/+
topic read {topics.rounds}
""" for bridge in bridges)
    return f"""\
# Mosquitto ACL of TierFL fleet {fleet!r}, written by `tierfl broker-config`.
# Nothing is allowed unless a line below allows it.

# Every authenticated user, i.e. every device: %u is the MQTT user name, which must be the device id.
pattern write {base}/up/%u
pattern write {base}/status/%u
pattern read {base}/down/%u

# The aggregator (the coordinator, with aggregator workers: each worker is a user of its own, the
# client id being the user name). Mosquitto checks each message
# against the topic it was published on, when it arrives (write) and before it is delivered
# (read), not the subscription's filter: a shared subscription $share/GROUP/{base}/up/+
# needs no line of its own, and a device subscribing to another's topic receives nothing.
user {aggregator_user}
topic read {topics.all_up()}
topic read {topics.all_status}
topic write {base}/down/+
topic readwrite {topics.rounds}
topic read {topics.all_workers("up")}
topic read {topics.all_workers("status")}
topic write {topics.all_workers("down")}
""" + blocks


def bridge_conf(fleet: str, remote: UserCredentials, remote_ca: str, name: str | None = None) -> str:
    """The `connection` section of a site broker's mosquitto.conf that bridges fleet `fleet` to a central broker,
    as the bridge user `remote` (its mqtts:// URL and password, from the central broker's credentials.json)
    whose certificate `remote_ca` verifies: devices' uplink and status out, their downlink and the round summaries in."""
    address = parse_url(remote.url)
    base = Topics(fleet).base
    return f"""
# Bridge of fleet {fleet!r} to the central broker {address.host}:{address.port}, written by `tierfl broker-config
# --bridge-to`: this broker's devices reach an aggregator connected there.
connection {name or remote.username}
address {address.host}:{address.port}
bridge_protocol_version mqttv311
remote_clientid {remote.username}
remote_username {remote.username}
remote_password {remote.password}
bridge_cafile {remote_ca}
bridge_insecure false
cleansession false
try_private true
notifications false
# reconnect after 2 s, backing off (with jitter) to 30 s between attempts while the central broker is away
restart_timeout 2 30
topic {base}/up/# out 1
topic {base}/status/# out 1
topic {base}/down/# in 1
topic {base}/rounds in 1
"""


def mosquitto_conf(fleet: str, conf_dir: Path, port: int = DEFAULT_TLS_PORT, bind: str | None = None,
                   broker_user: str = BROKER_USER) -> str:
    """mosquitto.conf for a fleet whose files the broker reads from `conf_dir` (an absolute path),
    running as `broker_user` when started as root."""
    if not conf_dir.is_absolute() or any(c.isspace() for c in str(conf_dir)):
        raise ValueError(f"the broker's config directory must be an absolute path without spaces, got {conf_dir}")
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    return f"""\
# Mosquitto 2 configuration of TierFL fleet {fleet!r}, written by `tierfl broker-config`.
# Run: mosquitto -c {conf_dir}/mosquitto.conf
# Started as root, Mosquitto runs as this user, which must be able to read this directory
# (started as another user, it stays that user).
user {broker_user}
per_listener_settings false
allow_anonymous false
password_file {conf_dir}/passwd
acl_file {conf_dir}/acl
# Keep queued QoS 1 messages and retained statuses across broker restarts.
persistence true
persistence_location {conf_dir}/data/

{listener}
protocol mqtt
# The MQTT client id is the user name (a listener setting): no device can take over the
# aggregator's session, or another device's, by connecting with its client id.
use_username_as_clientid true
cafile {conf_dir}/ca.crt
certfile {conf_dir}/server.crt
keyfile {conf_dir}/server.key
"""


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password hash: `$7$ITERATIONS$SALT$PBKDF2-SHA512` (12-byte salt, base64)."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """Whether `password` matches a `$7$` Mosquitto hash."""
    try:
        _, kind, iterations, salt, _ = hashed.split("$")
        if kind != "7":
            return False
        expected = hash_password(password, base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return secrets.compare_digest(expected, hashed)


def password_file_text(passwords: dict[str, str], mosquitto_passwd: str | None = None) -> str:
    """The password file of `passwords` (user -> plain password).

    With the `mosquitto_passwd` tool the installed Mosquitto hashes them its own way (`-U` on a
    private temporary file, so no password appears on a command line); without it they are hashed
    here in the PBKDF2-SHA512 format every Mosquitto 2 reads.
    """
    if mosquitto_passwd is None:
        return "".join(f"{user}:{hash_password(password)}\n" for user, password in passwords.items())
    with tempfile.TemporaryDirectory(prefix="tierfl-passwd-") as tmp:  # 0700: only we can read it
        path = Path(tmp) / "passwd"
        path.write_text("".join(f"{user}:{password}\n" for user, password in passwords.items()))
        done = subprocess.run([mosquitto_passwd, "-U", str(path)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{mosquitto_passwd} -U failed: {(done.stderr or done.stdout).strip()}")
        return path.read_text()


def _certificates(hosts: Sequence[str], fleet: str, days: int) -> dict[str, bytes]:
    """A new CA and a server certificate it signs (ECDSA P-256), PEM: ca.crt, ca.key, server.crt, server.key."""
    if importlib.util.find_spec("cryptography") is None:
        raise RuntimeError("tierfl broker-config needs the `cryptography` package: pip install 'tierfl[full]'")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    expires = now + datetime.timedelta(days=days)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TierFL"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def usage(cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                             crl_sign=cert_sign, encipher_only=False, decipher_only=False)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"TierFL fleet {fleet} CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(expires)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(cert_sign=True), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_name)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(expires)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(usage(cert_sign=False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
              .sign(ca_key, hashes.SHA256()))
    return {"ca.crt": ca.public_bytes(serialization.Encoding.PEM), "ca.key": pem_key(ca_key),
            "server.crt": server.public_bytes(serialization.Encoding.PEM), "server.key": pem_key(server_key)}


def _general_name(host: str) -> x509.GeneralName:
    """A SAN entry: an IP address or a DNS name."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _hand_to(user: str, paths: Iterable[Path]) -> None:
    """Run as root, make `user` (the broker's account) own `paths`; otherwise they stay ours."""
    if os.geteuid() != 0:
        return
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        log.warning("there is no user %r to run Mosquitto as; the broker's files stay root's", user)
        return
    for path in paths:
        os.chown(path, account.pw_uid, account.pw_gid)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def generate(
    out: str | os.PathLike[str],
    fleet: str,
    devices: Sequence[str],
    hosts: Sequence[str] = (),
    port: int = DEFAULT_TLS_PORT,
    bind: str | None = None,
    aggregator_user: str = AGGREGATOR_USER,
    conf_dir: str | os.PathLike[str] | None = None,
    broker_user: str = BROKER_USER,
    days: int = 3650,
    force: bool = False,
    mosquitto_passwd: str | None = None,
    workers: Sequence[str] = (),
    bridges: Sequence[str] = (),
    bridge_to: tuple[UserCredentials, str] | None = None,
) -> FleetCredentials:
    """Write a fleet's broker configuration into `out` (see FILES); return the generated credentials.

    `hosts`: the names devices use to reach the broker (the first goes into the URLs; localhost and
    127.0.0.1 are always in the certificate). `conf_dir`: where the broker will read the files from
    (default: `out`). `broker_user`: the account Mosquitto runs as when started as root; run as root,
    this gives it the files the broker reads. `mosquitto_passwd`: path of the tool to hash the
    passwords with, or None to hash them here. Refuses to replace existing files unless `force`.
    `workers`: users of aggregator workers (`tierfl aggregator --worker-of`); `bridges`: users of site brokers
    bridged to this one; `bridge_to`: this is a site broker, bridged to a central one as (its bridge user's
    credentials there, the central CA file).
    """
    check_id(fleet, "fleet")
    check_id(aggregator_user, "aggregator user")
    devices = _unique(check_id(d, "device id") for d in devices)
    if not devices:
        raise ValueError("no devices: give at least one device id")
    if aggregator_user in devices:
        raise ValueError(f"device id {aggregator_user!r} is the aggregator's user name; pick another")
    workers = _unique(check_id(w, "worker user") for w in workers)
    bridges = _unique(check_id(b, "bridge user") for b in bridges)
    names = [aggregator_user, *devices, *workers, *bridges]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"user names {', '.join(clash)} are given twice (aggregator, devices, workers and bridges "
                         "each need their own)")
    if days < 1:
        raise ValueError(f"certificate lifetime must be at least 1 day, got {days}")
    if not 1 <= port <= 65535:
        raise ValueError(f"bad port {port}: must be 1-65535")
    hosts = _unique([*hosts, "localhost", "127.0.0.1"]) if hosts else [socket.gethostname(), "localhost", "127.0.0.1"]
    out_dir = Path(out)
    existing = [name for name in FILES if (out_dir / name).exists()]
    if existing and not force:
        raise ValueError(f"{out_dir} already has {', '.join(existing)}; refusing to replace keys and "
                         "passwords that devices may be using (--force replaces them all)")
    read_dir = Path(conf_dir) if conf_dir is not None else out_dir.resolve()

    passwords = {user: secrets.token_urlsafe(32) for user in names}
    broker = f"mqtts://{hosts[0] if ':' not in hosts[0] else f'[{hosts[0]}]'}:{port}"
    ca_file = str(read_dir / "ca.crt")

    def user(name: str) -> UserCredentials:
        url = broker.replace("://", f"://{name}:{passwords[name]}@", 1) + f"?ca={ca_file}"
        return UserCredentials(username=name, password=passwords[name], url=url)

    credentials = FleetCredentials(fleet=fleet, broker=broker, ca_file=ca_file, aggregator=user(aggregator_user),
                                   devices={d: user(d) for d in devices}, workers={w: user(w) for w in workers},
                                   bridges={b: user(b) for b in bridges})
    conf = mosquitto_conf(fleet, read_dir, port, bind, broker_user)
    if bridge_to is not None:
        conf += bridge_conf(fleet, *bridge_to)
    contents = {
        **_certificates(hosts, fleet, days),
        "mosquitto.conf": conf.encode(),
        "passwd": password_file_text(passwords, mosquitto_passwd).encode(),
        "acl": acl_text(fleet, aggregator_user, workers, bridges).encode(),
        "credentials.json": (credentials.model_dump_json(indent=2) + "\n").encode(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data").mkdir(exist_ok=True)
    secret = {"mosquitto.conf"} if bridge_to is not None else set()  # it holds the bridge user's password
    for name, (mode, _) in FILES.items():
        atomic_write(out_dir / name, lambda f, data=contents[name]: f.write(data), mode=SECRET if name in secret else mode)
    _hand_to(broker_user, [out_dir / name for name in ("server.key", "passwd", "acl", "data", *secret)])
    log.info("wrote the Mosquitto configuration of fleet %r for %d devices to %s", fleet, len(devices), out_dir)
    return credentials


EPILOG = f"""files written to DIR:
{chr(10).join(f"  {name:<17} {'0600' if mode == SECRET else '0644'}  {what}" for name, (mode, what) in FILES.items())}
  data/                   Mosquitto's persistence directory

example:
  tierfl broker-config --fleet lab --devices pi-1,pi-2,laptop --host broker.lan --out /etc/tierfl/broker
  mosquitto -c /etc/tierfl/broker/mosquitto.conf     # started as root, it runs as --broker-user
  # the aggregator and each device take their URL from credentials.json, e.g.
  tierfl aggregator --fleet lab --broker 'mqtts://aggregator:PASSWORD@broker.lan:8883?ca=/etc/tierfl/broker/ca.crt'
  tierfl client --fleet lab --device-id pi-1 --broker 'mqtts://pi-1:PASSWORD@broker.lan:8883?ca=ca.crt' --data ...

ACL: a device (MQTT user name = device id) may publish only tierfl/v1/FLEET/up/ID and
status/ID and receive only down/ID; the aggregator user receives every up/ and status/ topic
(shared subscriptions too) and publishes every down/ topic and rounds. Anonymous clients,
wrong passwords and clients without TLS are refused.

past one machine (docs/scaling.md):
  # aggregator workers get users of their own; a site broker bridges to this central one as site-1
  tierfl broker-config --fleet lab --devices pi-1,pi-2 --worker-user w1 --worker-user w2 --bridge-user site-1 \\
      --host central.lan --out /etc/tierfl/central
  tierfl broker-config --fleet lab --devices pi-1,pi-2 --host site1.lan --out /etc/tierfl/site1 \\
      --bridge-to /etc/tierfl/central/credentials.json:site-1
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl broker-config` options to `parser`."""
    parser.description = (
        "Write a Mosquitto 2 configuration for one fleet: TLS with a CA generated here, a random "
        "password per device and for the aggregator, and an ACL that lets each device publish only "
        "its own update and status topics and read only its own task topic."
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--fleet", required=True, help="fleet name, the topic namespace")
    parser.add_argument("--devices", required=True, help="comma-separated device ids; each is also the device's MQTT user name")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write the files to")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="a DNS name or IP address devices use to reach the broker; repeat for more "
                             "(default: this machine's host name; localhost and 127.0.0.1 are always included)")
    parser.add_argument("--port", type=int, default=DEFAULT_TLS_PORT, help="the TLS listener's port (default: %(default)s)")
    parser.add_argument("--bind", metavar="ADDRESS", help="listen only on this address (default: every interface)")
    parser.add_argument("--aggregator-user", default=AGGREGATOR_USER, help="the aggregator's MQTT user name (default: %(default)s)")
    parser.add_argument("--conf-dir", type=Path, metavar="PATH",
                        help="absolute directory the broker will read the files from, if not DIR (the paths in mosquitto.conf)")
    parser.add_argument("--broker-user", default=BROKER_USER,
                        help="the account Mosquitto runs as when started as root; run as root, this command "
                             "gives it server.key, passwd, acl and data/ (default: %(default)s)")
    parser.add_argument("--days", type=int, default=3650, help="certificate lifetime in days (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace existing keys, certificates and passwords in DIR")
    parser.add_argument("--worker-user", action="append", default=[], metavar="NAME",
                        help="an MQTT user for an aggregator worker (`tierfl aggregator --worker-of`, its --id NAME): "
                             "it reads the uplink through the shared subscription and the devices' status, and only "
                             "its own workers/NAME/ topics; repeat for more")
    parser.add_argument("--bridge-user", action="append", default=[], metavar="NAME",
                        help="an MQTT user for a site broker bridged to this (central) one: it publishes the fleet's "
                             "up/ and status/ topics and reads down/ and rounds; repeat for more sites")
    parser.add_argument("--bridge-to", metavar="CREDENTIALS.json:USER",
                        help="make this a site broker bridged to a central one: the central broker's credentials.json "
                             "and the --bridge-user it was given there; mosquitto.conf gets a `connection` section "
                             "(devices' up/ and status/ out, their down/ and rounds in, over TLS verified with the "
                             "central CA)")


def run(args: argparse.Namespace) -> int:
    """Generate the configuration; print where it is and how to start the broker."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        log.info("mosquitto_passwd is not on PATH; hashing the passwords here (PBKDF2-SHA512)")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    bridge_to = None
    if args.bridge_to:
        path, _, user = args.bridge_to.rpartition(":")
        if not path or not user:
            raise ValueError(f"--bridge-to takes CREDENTIALS.json:USER (the central broker's credentials.json and its "
                             f"--bridge-user), got {args.bridge_to!r}")
        try:
            central = FleetCredentials.load(path)
        except pydantic.ValidationError as exc:
            raise ValueError(f"{path} is not a credentials.json written by `tierfl broker-config` "
                             f"({exc.errors()[0]['msg']}); give the central broker's") from None
        if user not in central.bridges:
            raise ValueError(f"{path} has no bridge user {user!r} (it has: {', '.join(central.bridges) or 'none'}); "
                             "write the central broker's files with --bridge-user")
        bridge_to = (central.bridges[user], central.ca_file)
    credentials = generate(args.out, args.fleet, devices, hosts=args.host, port=args.port, bind=args.bind,
                           aggregator_user=args.aggregator_user, conf_dir=args.conf_dir, broker_user=args.broker_user,
                           days=args.days, force=args.force, mosquitto_passwd=tool, workers=args.worker_user,
                           bridges=args.bridge_user, bridge_to=bridge_to)
    conf = Path(credentials.ca_file).with_name("mosquitto.conf")
    print(f"wrote the broker configuration of fleet {credentials.fleet!r} ({len(credentials.devices)} devices) "
          f"to {args.out}\nstart the broker:  mosquitto -c {conf}\n"
          f"broker URL:        {credentials.broker} (users and passwords in {args.out / 'credentials.json'})")
    return 0
