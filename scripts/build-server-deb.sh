#!/usr/bin/env bash
# Build the fleet-server .deb with dpkg-deb: the binary, its systemd unit,
# a starting config (a conffile: upgrades keep your edits), the example
# config and the deployment guide.
#
#   scripts/build-server-deb.sh                  release build for this machine
#   scripts/build-server-deb.sh --target aarch64-unknown-linux-gnu
#   scripts/build-server-deb.sh --bin PATH       package an existing binary
#   --out DIR                                    where the .deb goes (default target/debian)
#   DEB_COMPRESS=none|gzip|xz (default xz)       dpkg-deb's compressor (the suite uses none)
#
# The package: /usr/bin/fleet-server, /lib/systemd/system/fleet-server.service,
# /etc/fleet-server/fleet-server.toml, a `fleet-server` system user owning
# /var/lib/fleet-server. The unit is enabled, not started: the config needs
# the release keys first (docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="" target="" out="${CARGO_TARGET_DIR:-target}/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --target) target=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--bin PATH | --target TRIPLE] [--out DIR]" >&2; exit 2 ;;
  esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ -z "$bin" ]; then
  if [ -n "$target" ]; then
    cargo build --locked --release -p fleet-server --target "$target"
    bin="${CARGO_TARGET_DIR:-target}/$target/release/fleet-server"
  else
    cargo build --locked --release -p fleet-server
    bin="${CARGO_TARGET_DIR:-target}/release/fleet-server"
  fi
fi
[ -x "$bin" ] || { echo "no executable at $bin" >&2; exit 2; }

# The Debian architecture of the binary, from its ELF header.
case "$(file -b "$bin" 2>/dev/null || true)" in
  *x86-64*) arch=amd64 ;;
  *aarch64*|*ARM\ aarch64*) arch=arm64 ;;
  *ARM,*|*EABI5*) arch=armhf ;;
  *) case "$target" in
       aarch64*) arch=arm64 ;; armv7*) arch=armhf ;; *) arch=$(dpkg --print-architecture) ;;
     esac ;;
esac

# The newest glibc symbol version the binary uses is its libc6 dependency.
glibc=$( (objdump -T "$bin" 2>/dev/null || true) | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
depends="adduser"
[ -n "$glibc" ] && depends="libc6 (>= $glibc), $depends"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -Dm755 "$bin" "$root/usr/bin/fleet-server"
install -Dm644 fleet-server/debian/fleet-server.service "$root/lib/systemd/system/fleet-server.service"
install -Dm644 fleet-server/debian/fleet-server.toml "$root/etc/fleet-server/fleet-server.toml"
install -Dm644 docs/fleet-server.example.toml "$root/usr/share/doc/fleet-server/fleet-server.example.toml"
install -Dm644 docs/deploy.md "$root/usr/share/doc/fleet-server/deploy.md"
install -Dm644 docs/fleet-server.md "$root/usr/share/doc/fleet-server/fleet-server.md"
mkdir -p "$root/DEBIAN"
for s in postinst prerm postrm; do install -m755 "fleet-server/debian/$s" "$root/DEBIAN/$s"; done
echo /etc/fleet-server/fleet-server.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: fleet-server
Version: $version
Architecture: $arch
Maintainer: edgefleet maintainers <edgefleet@example.invalid>
Section: net
Priority: optional
Installed-Size: $size
Depends: $depends
Recommends: mosquitto
Suggests: postgresql
Description: edgefleet fleet server
 Bundle registry, device inventory, staged rollouts gated on model health,
 A/B experiments, telemetry ingest (embedded MQTT broker or an external
 one), operator API and web console. Embedded defaults (sled, local files,
 embedded broker) on one box; PostgreSQL for larger fleets.
CONTROL
mkdir -p "$out"
deb="$out/fleet-server_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z${DEB_COMPRESS:-xz}" --build "$root" "$deb" >/dev/null
ls -l "$deb"
