#!/usr/bin/env bash
# A real aarch64 check: the portable client training under an emulated 64-bit ARM Debian.
#
#   sudo scripts/aarch64_check.sh [ROOT]        # ROOT default: /work/aarch64-root (keep it OUTSIDE the repo)
#
# 1. builds an arm64 Debian bookworm root from Debian's packages without running arm64 code
#    (no binfmt_misc here): `debootstrap --foreign` first stage, every downloaded .deb unpacked
#    with `dpkg-deb -x`, qemu-aarch64-static copied in; everything runs as
#    `chroot ROOT /usr/bin/qemu-aarch64-static /usr/bin/python3.11 ...`, explicitly;
# 2. downloads aarch64 wheels on the host (`pip download --platform manylinux_2_*_aarch64
#    --only-binary=:all:`), creates a venv in the root `--without-pip` and installs the wheels
#    under qemu with pip run from Debian's own pip wheel (python3-pip-whl) as a zipapp, offline;
# 3. builds this project's committed HEAD as a pure-Python wheel on the host and installs it
#    into that venv as `tierfl[edge,signing]` (the README's device install); an inference smoke test and an import
#    probe of the device modules run under qemu;
# 4. starts `tierfl aggregator --tiers a,c --tier-policy auto` on the host (same commit) against the
#    loopback Mosquitto; once it has exported its tiers, copies them into the root and runs the
#    README's device path inside the emulated root: `tierfl bench --artifacts` (the portable
#    backend, each tier in its own child process) and then `tierfl client --backend portable
#    --bench bench.json` (the chroot shares the host's network namespace, so 127.0.0.1:1883 is the
#    host's broker); waits for ROUNDS rounds;
# 5. writes benchmarks/aarch64.log (everything printed) and benchmarks/aarch64.md (timings).
#
# qemu-user runs one program; without binfmt_misc the kernel cannot exec an aarch64 binary, so
# bench's child processes (sys.executable) could not start. The device's Python therefore runs
# with argv[0] = VENV/bin/python-qemu, a script whose #! interpreter is qemu itself (the kernel runs
# that natively) and which starts the venv's Python under qemu again: sys.executable works.
#
# Idempotent: steps already done are skipped (root, wheels, venv, installs keyed by commit).
# Slow (minutes): not part of `make test`. Emulated speed says nothing about a real Raspberry Pi.
#
# Environment: WHEELS (host wheel folder, default ROOT/../aarch64-wheels), ROUNDS (3),
# BROKER (mqtt://127.0.0.1:1883), HOSTPY (the repo's .venv python), MIRROR (default: this machine's apt
# mirror), SKIP_RUN=1 (steps 1-3 only),
# RUN_TIMEOUT (seconds for the whole federated run, default 600 + 900 per round).
# Exit status: 0 bench ran and all rounds committed; 1 the bench or the federated run failed; 3 the run was skipped
# (SKIP_RUN=1, or the installed commit has no portable client); 2 usage.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(realpath -m "${1:-${ROOT:-/work/aarch64-root}}")
WHEELS=$(realpath -m "${WHEELS:-$(dirname "$ROOT")/aarch64-wheels}")
HOSTPY=${HOSTPY:-$REPO/.venv/bin/python}
# The machine's own Debian mirror (its apt sources: deb822 .sources files or sources.list), so the
# arm64 root comes from wherever this machine is allowed to fetch packages.
apt_mirror() {
    local uri
    uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && u && $0 !~ /security/ {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
                           /etc/apt/sources.list 2>/dev/null || true)
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${MIRROR:-$(apt_mirror)}
SUITE=bookworm
ROUNDS=${ROUNDS:-3}
BROKER=${BROKER:-mqtt://127.0.0.1:1883}
RUN_TIMEOUT=${RUN_TIMEOUT:-$((600 + 900 * ROUNDS))}
VENV=/opt/tierfl-venv            # inside ROOT
QEMU=/usr/bin/qemu-aarch64-static
DEVICE_PIP=/usr/share/python-wheels/pip-23.0.1-py3-none-any.whl/pip   # Debian's python3-pip-whl, run as a zipapp

case "$ROOT/" in "$REPO"/*) echo "ROOT must be outside the repo" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot)" >&2; exit 2; }
[ -x "$HOSTPY" ] || { echo "no $HOSTPY: run 'make venv' first" >&2; exit 2; }

WORK=$(mktemp -d /tmp/aarch64-check.XXXXXX)
exec > >(tee "$WORK/run.log") 2>&1
TIMINGS=$WORK/timings.txt
: > "$TIMINGS"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

note() { echo "$1=$2" >> "$TIMINGS"; }
step() { echo; echo "=== $* ($(date +%T))"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# Run an aarch64 program in the root through qemu-user, explicitly (no binfmt_misc).
# A clean environment: the host's PIP_*, PYTHONPATH, VIRTUAL_ENV... must not leak into the device.
CHROOT=$(command -v chroot)
dev() { env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$CHROOT" "$ROOT" "$QEMU" "$@"; }
# The same for `dev_exec ... &`: the background job becomes qemu itself, so $! can be signalled.
dev_exec() { exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$CHROOT" "$ROOT" "$QEMU" "$@"; }
# The venv's Python, with sys.executable = VENV/bin/python-qemu: programs that start Python children
# (tierfl bench) work under qemu-user (see the header).
PYQ=$VENV/bin/python-qemu
devpy() { dev -0 "$PYQ" "$VENV/bin/python" "$@"; }
devpy_exec() { dev_exec -0 "$PYQ" "$VENV/bin/python" "$@"; }
# onnxruntime's cpuinfo complains that /sys is not mounted; those lines are noise here. (Mounting
# /proc and /sys makes it parse the host's x86 /proc/cpuinfo and segfault under qemu, so don't.)
quiet() { grep -v -e '^Error in cpuinfo' -e 'cpuid_info warning' -e 'cpuinfo_initialize failed' || true; }

COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
note date "$(date -u +%Y-%m-%dT%H:%MZ)"
note commit "$COMMIT"
note host "$(uname -m), $(nproc) cores, $(. /etc/os-release && echo "$PRETTY_NAME")"
echo "aarch64 check: repo $REPO at $COMMIT, root $ROOT, wheels $WHEELS, log $WORK"

# --- 0. host tools -------------------------------------------------------------------------
step "host tools"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x "$QEMU" ] || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
note qemu "$($QEMU --version | head -1)"
echo "$($QEMU --version | head -1); binfmt_misc: $(ls /proc/sys/fs/binfmt_misc 2>/dev/null | grep -c aarch64 || true) aarch64 handlers (not used)"

# --- 1. the arm64 root ---------------------------------------------------------------------
step "1. arm64 Debian $SUITE root at $ROOT"
t=$(now)
if [ ! -f "$ROOT/.tierfl-root-done" ]; then
    debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3.11,python3.11-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
    # The second stage would run arm64 maintainer scripts; without binfmt it cannot. Unpacking
    # every package is enough for Python: no maintainer script is needed to run it.
    n=0
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; n=$((n + 1)); done
    echo "unpacked $n packages with dpkg-deb -x"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' > "$ROOT/etc/hosts"
    touch "$ROOT/.tierfl-root-done"
    note root_s "$(since "$t")"
else
    echo "already built (remove $ROOT/.tierfl-root-done to rebuild)"
    note root_s 0
fi
cmp -s "$QEMU" "$ROOT$QEMU" || cp "$QEMU" "$ROOT$QEMU"
dev /usr/bin/python3.11 -c "import sys, platform; print('guest:', platform.machine(), sys.version.split()[0])"
note debs "$(ls "$ROOT"/var/cache/apt/archives/*.deb | wc -l)"

# --- 3a. this project as a wheel (committed HEAD, not the working tree) ----------------------
step "3a. tierfl wheel of $COMMIT"
t=$(now)
mkdir -p "$WHEELS"
SRC=$WORK/src
mkdir -p "$SRC"
git -C "$REPO" archive HEAD | tar -x -C "$SRC"
rm -f "$WHEELS"/tierfl-*.whl
"$HOSTPY" -m pip wheel -q --no-deps -w "$WHEELS" "$SRC" > "$WORK/wheel.log" 2>&1 || { cat "$WORK/wheel.log"; exit 1; }
TIERFL_WHL=$(ls "$WHEELS"/tierfl-*.whl)
echo "built $(basename "$TIERFL_WHL")"
note wheel_s "$(since "$t")"
EXTRAS=edge
if unzip -p "$TIERFL_WHL" '*.dist-info/METADATA' | grep -qx 'Provides-Extra: signing'; then
    EXTRAS=edge,signing   # the README's device install: device keys, the aggregator's signatures checked
fi
if unzip -p "$TIERFL_WHL" '*.dist-info/METADATA' | grep -qx 'Provides-Extra: edge'; then
    DEVICE_REQ=("tierfl[$EXTRAS]")
    DOWNLOAD_REQ=("tierfl[$EXTRAS] @ file://$TIERFL_WHL")
    TIERFL_NODEPS=0
else  # before the edge extra existed: its runtime pieces by name, the project itself with --no-deps
    echo "NOTE: this commit's wheel has no [edge] extra; installing onnxruntime numpy paho-mqtt pydantic by name"
    DEVICE_REQ=(onnxruntime 'numpy>=2,<3' 'paho-mqtt>=2.1,<3' 'pydantic>=2.6,<3')
    DOWNLOAD_REQ=("${DEVICE_REQ[@]}")
    TIERFL_NODEPS=1
fi

# --- 2. aarch64 wheels, downloaded on the host -----------------------------------------------
step "2. aarch64 wheels for ${DEVICE_REQ[*]}"
t=$(now)
# Every manylinux tag glibc 2.36 (bookworm) accepts: with only manylinux_2_28, pip silently falls
# back to pydantic 1.x because pydantic-core ships manylinux_2_17 (manylinux2014) aarch64 wheels.
platforms=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
"$HOSTPY" -m pip download -q "${platforms[@]}" --python-version 3.11 --implementation cp --only-binary=:all: \
    -d "$WHEELS" "${DOWNLOAD_REQ[@]}" 2>&1 | grep -v 'is ignored: it is neither' || true
note download_s "$(since "$t")"
ls -l "$WHEELS" | awk 'NR > 1 { printf "  %10d  %s\n", $5, $9 }'
mkdir -p "$ROOT/opt/wheels"
rm -f "$ROOT"/opt/wheels/*.whl
cp -l "$WHEELS"/*.whl "$ROOT/opt/wheels/" 2>/dev/null || cp "$WHEELS"/*.whl "$ROOT/opt/wheels/"

# --- 2b. the device venv ---------------------------------------------------------------------
step "2b. venv $VENV in the root (--without-pip, under qemu)"
t=$(now)
if [ ! -x "$ROOT$VENV/bin/python" ]; then
    dev /usr/bin/python3.11 -m venv --without-pip "$VENV"
    note venv_s "$(since "$t")"
else
    echo "already there"
    note venv_s 0
fi

step "2c. install ${DEVICE_REQ[*]} into the venv (pip from Debian's pip wheel, offline, under qemu)"
t=$(now)
stamp="$ROOT$VENV/.tierfl-installed"
want="$COMMIT $(cd "$WHEELS" && ls | grep -v '^tierfl-' | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # Show every wheel pip picks; pip under qemu is the slow part (about a minute).
    if [ "$TIERFL_NODEPS" = 1 ]; then
        dev "$VENV/bin/python" "$DEVICE_PIP" install --no-index --find-links /opt/wheels --no-cache-dir \
            --disable-pip-version-check "${DEVICE_REQ[@]}" 2>&1 | quiet
        dev "$VENV/bin/python" "$DEVICE_PIP" install --no-index --find-links /opt/wheels --no-cache-dir \
            --disable-pip-version-check --no-deps --force-reinstall "/opt/wheels/$(basename "$TIERFL_WHL")" 2>&1 | quiet
    else
        # the wheel's version does not change between commits: reinstall tierfl itself, keep the rest
        dev "$VENV/bin/python" "$DEVICE_PIP" uninstall -q -y tierfl 2>&1 | quiet
        dev "$VENV/bin/python" "$DEVICE_PIP" install --no-index --find-links /opt/wheels --no-cache-dir \
            --disable-pip-version-check "${DEVICE_REQ[@]}" 2>&1 | quiet
    fi
    echo "$want" > "$stamp"
    note install_s "$(since "$t")"
else
    echo "already installed for $want"
    note install_s 0
fi
dev "$VENV/bin/python" "$DEVICE_PIP" list --disable-pip-version-check --format freeze 2>/dev/null > "$WORK/freeze.txt"
sed 's/^/  /' "$WORK/freeze.txt"
note device_wheels "$(tr '\n' ' ' < "$WORK/freeze.txt")"
if dev "$VENV/bin/python" -c "import onnxruntime.training" >/dev/null 2>&1; then
    echo "NOTE: onnxruntime.training importable on the device: not a plain-onnxruntime install"
fi
printf '#!%s /bin/sh\nexec %s -0 %s %s "$@"\n' "$QEMU" "$QEMU" "$PYQ" "$VENV/bin/python" > "$ROOT$PYQ"
chmod 755 "$ROOT$PYQ"
echo "sys.executable under qemu: $(devpy -c 'import sys, subprocess; print(sys.executable, subprocess.run([sys.executable, "-c", "import platform; print(platform.machine())"], capture_output=True, text=True, check=True).stdout.strip(), "child ok")')"

# --- 3b. smoke test and import probe ---------------------------------------------------------
step "3b. inference smoke test under qemu"
t=$(now)
mkdir -p "$ROOT/opt/check"
cp "$REPO/scripts/aarch64_check.py" "$ROOT/opt/check/"
[ -f "$ROOT/opt/check/mlp.onnx" ] || "$HOSTPY" "$REPO/scripts/aarch64_check.py" make-model "$ROOT/opt/check/mlp.onnx"
dev "$VENV/bin/python" /opt/check/aarch64_check.py smoke /opt/check/mlp.onnx 2>&1 | quiet | tee "$WORK/smoke.log"
note smoke_s "$(since "$t")"
echo "same test on the host, native x86_64 (for scale):"
"$HOSTPY" "$REPO/scripts/aarch64_check.py" smoke "$ROOT/opt/check/mlp.onnx" 2>&1 | sed 's/^SMOKE /HOST /' | tee -a "$WORK/smoke.log"
usage=$(dev "$VENV/bin/python" -m tierfl.cli --help)
echo "python -m tierfl.cli --help under qemu: $(echo "$usage" | head -1)"

step "3c. project imports on the device"
t=$(now)
dev "$VENV/bin/python" /opt/check/aarch64_check.py imports 2>&1 | quiet | tee "$WORK/imports.log"
note imports_s "$(since "$t")"

# --- 4. the federated run ------------------------------------------------------------------
step "4. $ROUNDS rounds: aggregator on the host, tierfl client --backend portable under qemu"
client_py=$ROOT$VENV/lib/python3.11/site-packages/edge_client/cli.py
reason=""
if [ "${SKIP_RUN:-0}" = 1 ]; then
    reason="SKIP_RUN=1"
elif ! grep -q '"portable"' "$client_py" 2>/dev/null && ! grep -q "portable" "$ROOT$VENV/lib/python3.11/site-packages/edge_client/backends.py" 2>/dev/null; then
    reason="commit $COMMIT has no \`tierfl client --backend portable\` yet"
elif grep -q '^IMPORT FAIL edge_client.cli' "$WORK/imports.log"; then
    reason="edge_client.cli does not import on the device at $COMMIT ($(grep '^IMPORT FAIL edge_client.cli' "$WORK/imports.log" | cut -d: -f2- | cut -c1-160))"
fi
RC=0
if [ -n "$reason" ]; then
    echo "SKIPPED the federated run: $reason"
    note run skipped
    note run_reason "$reason"
    RC=3
else
    (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null || {
        echo "no MQTT broker on 127.0.0.1:1883: starting mosquitto for this run"
        mosquitto -p 1883 > "$WORK/mosquitto.log" 2>&1 & PIDS+=($!)
        sleep 1
    }
    [ -f "$ROOT/opt/check/digits.npz" ] || "$HOSTPY" -c \
        "from models.data import load_digits, save_npz; save_npz('$ROOT/opt/check/digits.npz', load_digits())"
    FLEET=aarch64-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
    STATE=$WORK/aggregator-state
    agg_args=(--log-format text aggregator --broker "$BROKER" --fleet "$FLEET" --min-clients 1 --rounds "$ROUNDS"
              --eval-data digits --state-dir "$STATE" --round-timeout 900 --tiers a,c --tier-policy auto)
    bench_args=(--log-format text bench --artifacts /opt/check/artifacts --data /opt/check/digits.npz
                --steps "${BENCH_STEPS:-20}" --epochs 1 --out /opt/check/bench)
    client_args=(--log-format text client --broker "$BROKER" --fleet "$FLEET" --device-id pi-emulated
                 --data /opt/check/digits.npz --backend portable --cache-dir /opt/check/cache)
    note aggregator_cmd "tierfl ${agg_args[*]}"
    note bench_cmd "tierfl ${bench_args[*]}"
    t=$(now)
    # The aggregator runs the same committed source as the device, not the working tree: with
    # PYTHONSAFEPATH, `python -m` does not put the current directory (maybe the repo) first on sys.path.
    PYTHONSAFEPATH=1 PYTHONPATH=$SRC "$HOSTPY" -m tierfl.cli "${agg_args[@]}" > "$WORK/aggregator.log" 2>&1 & AGG=$!; PIDS+=($AGG)
    rm -rf "$ROOT/opt/check/cache" "$ROOT/opt/check/artifacts" "$ROOT/opt/check/bench"
    # The device path of the README: the fleet's tiers (a copy of the aggregator's export), benched on the device.
    for _ in $(seq 120); do
        grep -q "waiting for devices" "$WORK/aggregator.log" 2>/dev/null && break
        kill -0 "$AGG" 2>/dev/null || break
        sleep 1
    done
    cp -r "$STATE/artifacts" "$ROOT/opt/check/artifacts" 2>/dev/null || true   # none: bench says so
    tb=$(now)
    if devpy "$VENV/bin/tierfl" "${bench_args[@]}" > "$WORK/bench.raw.log" 2>&1; then
        note bench_s "$(since "$tb")"
        cp "$ROOT/opt/check/bench/bench.json" "$ROOT/opt/check/bench/bench.md" "$WORK/"
        client_args+=(--bench /opt/check/bench/bench.json)
        note bench "bench.json written"
    else
        note bench "FAILED (exit $?): $(quiet < "$WORK/bench.raw.log" | grep -v '^ ' | tail -1 | cut -c1-300)"
        BENCH_FAILED=1
    fi
    quiet < "$WORK/bench.raw.log" | sed 's/^/[pi-emulated bench] /'
    note client_cmd "tierfl ${client_args[*]}"
    t=$(now)
    devpy_exec "$VENV/bin/tierfl" "${client_args[@]}" > "$WORK/client.raw.log" 2>&1 & CLIENT=$!; PIDS+=($CLIENT)
    tail -n +1 -f "$WORK/aggregator.log" --pid "$AGG" | sed 's/^/[aggregator] /' &
    deadline=$(( $(date +%s) + RUN_TIMEOUT ))
    why=""
    while kill -0 "$AGG" 2>/dev/null; do
        if ! kill -0 "$CLIENT" 2>/dev/null; then why="the emulated client exited early"; break; fi
        if [ "$(date +%s)" -ge "$deadline" ]; then why="not done after ${RUN_TIMEOUT}s"; break; fi
        # a device error would otherwise wait out the round timeout: fail fast instead
        if grep -q ' ERROR ' "$WORK/client.raw.log"; then why="the emulated client logged an error"; sleep 2; break; fi
        sleep 2
    done
    if kill -0 "$AGG" 2>/dev/null; then
        echo "$why: stopping the aggregator"
        kill "$AGG"; wait "$AGG" || true
        note run "FAILED: $why, before $ROUNDS rounds were committed"; RC=1
    else
        wait "$AGG" && agg_rc=0 || agg_rc=$?
        note run_s "$(since "$t")"
        if grep -q "round $ROUNDS committed" "$WORK/aggregator.log"; then
            note run "all $ROUNDS rounds committed"
        else
            note run "FAILED (aggregator exit $agg_rc without round $ROUNDS committed)"; RC=1
        fi
    fi
    sleep 1
    kill -TERM "$CLIENT" 2>/dev/null || true   # qemu-user passes SIGTERM to the guest: a clean stop
    for _ in $(seq 30); do kill -0 "$CLIENT" 2>/dev/null || break; sleep 1; done
    kill -KILL "$CLIENT" 2>/dev/null || true
    wait "$CLIENT" 2>/dev/null || true
    quiet < "$WORK/client.raw.log" > "$WORK/client.log"
    err=$(grep -m1 -A2 ' ERROR ' "$WORK/client.log" | tr '\n' ' ' | cut -c1-400 || true)
    [ -n "$err" ] || err=$(grep -E '^[A-Za-z_.]*(Error|Exception)[A-Za-z_.]*:' "$WORK/client.log" | tail -1 | cut -c1-400 || true)
    [ -z "$err" ] || note run_error "$err"
    sed 's/^/[pi-emulated] /' "$WORK/client.log"
    [ "${BENCH_FAILED:-0}" = 0 ] || RC=1
fi

# --- 5. outputs ----------------------------------------------------------------------------
step "5. report"
echo "timings:"; sed 's/^/  /' "$TIMINGS"
"$HOSTPY" "$REPO/scripts/aarch64_check.py" report "$WORK" "${STATE:-$WORK/none}" "$REPO/benchmarks/aarch64.md"
echo "exit $RC"
exec > /dev/null 2>&1   # let tee see the end of the log before copying it
sleep 1
cp "$WORK/run.log" "$REPO/benchmarks/aarch64.log"
exit "$RC"
