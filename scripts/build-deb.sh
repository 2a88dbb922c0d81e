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
glibc=$(value board glibc)
os=$(value board os)
[ -n "$glibc" ] || { echo "$profile_file: [board] glibc is missing" >&2; exit 2; }

build_args=()
[ "$cpu" != generic ] && build_args+=(--cpu "$cpu")
[ "$(value board nnef_only)" = true ] && build_args+=(--nnef-only)
scripts/cross-build.sh "$triple" --release "${build_args[@]}"

staging=target/deb-staging
rm -rf "$staging" && mkdir -p "$staging"
cp "$profile_file" "$staging/agent.toml"
sed -e "s/@WATCHDOG_SEC@/${watchdog}s/" -e "s/@RESTART_SEC@/${restart}s/" \
    -e "s/@MEMORY_MAX@/$memory/" targets/systemd/edge-agent.service > "$staging/edge-agent.service"

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
cargo deb -p edge-agent --no-build --no-strip --target "$triple" --profile dist \
  --deb-version "$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)+$board"
deb=$(ls -t "${CARGO_TARGET_DIR:-target}/$triple/debian/"*"+${board}_"*.deb | head -1)
ls -l "$deb"

# The package must install on the board's OS: its libc6 dependency (from
# dpkg-shlibdeps) may not be newer than the glibc the profile declares.
depends=$(dpkg-deb -f "$deb" Depends)
need=$( (printf '%s\n' "$depends" | grep -o 'libc6[^,]*(>= *[0-9.]*)' | grep -o '[0-9][0-9.]*)' | tr -d ')' | sort -V | tail -1) || true)
echo "Depends: $depends"
if [ "$glibc" = static ]; then
  [ -z "$need" ] || { echo "$board: expected a static build, the package depends on libc6 >= $need" >&2; exit 1; }
elif [ -n "$need" ] && [ "$(printf '%s\n%s\n' "$need" "$glibc" | sort -V | tail -1)" != "$glibc" ]; then
  echo "$board: the package needs glibc >= $need, but $os has $glibc;" \
    "use the static aarch64-unknown-linux-musl triple or a newer OS" >&2
  # cargo-deb also links the package into target/debian/.
  rm -f "$deb" "${CARGO_TARGET_DIR:-target}/debian/$(basename "$deb")"
  exit 1
fi
