#!/usr/bin/env bash
# Build the edge-agent .deb for a board profile (targets/BOARD.toml):
# cross-builds the size-optimized agent for the board's triple and CPU, fills
# the board's config and systemd limits in, and runs cargo-deb.
#
#   scripts/build-deb.sh BOARD        e.g. rpi4 (arm64), rpi3 (armhf)
set -euo pipefail
cd "$(dirname "$0")/.."
board=${1:?usage: scripts/build-deb.sh BOARD (see targets/)}
profile_file="targets/$board.toml"
[ -f "$profile_file" ] || { echo "no board profile $profile_file" >&2; exit 2; }

value() { # section key → value of `key = "..."` or `key = N` in [section]
  awk -v sec="[$1]" -v key="$2" '
    /^\[/ { in_sec = ($0 == sec) }
    in_sec && $1 == key { sub(/^[^=]*= */, ""); gsub(/"/, ""); print; exit }' "$profile_file"
}
triple=$(value board triple)
cpu=$(value board target_cpu)
watchdog=$(value systemd watchdog_sec)
restart=$(value systemd restart_sec)
memory=$(value systemd memory_max)

cpu_args=()
[ "$cpu" != generic ] && cpu_args=(--cpu "$cpu")
scripts/cross-build.sh "$triple" --release "${cpu_args[@]}"

staging=target/deb-staging
rm -rf "$staging" && mkdir -p "$staging"
cp "$profile_file" "$staging/agent.toml"
sed -e "s/@WATCHDOG_SEC@/${watchdog}s/" -e "s/@RESTART_SEC@/${restart}s/" \
    -e "s/@MEMORY_MAX@/$memory/" targets/systemd/edge-agent.service > "$staging/edge-agent.service"

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
cargo deb -p edge-agent --no-build --no-strip --target "$triple" --profile dist \
  --deb-version "$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)+$board"
ls -l "${CARGO_TARGET_DIR:-target}/$triple/debian/"*.deb
