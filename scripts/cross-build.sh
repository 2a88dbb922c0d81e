#!/usr/bin/env bash
# Cross-build edge-agent for an ARM target.
#
#   scripts/cross-build.sh TARGET [--release] [--cpu CPU] [--nnef-only]
#   TARGET: aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf |
#           aarch64-unknown-linux-musl | all
#
# With a Docker or Podman engine that answers, it uses `cross` and the
# images pinned in Cross.toml. Otherwise (the usual case on a Debian 12
# machine, and in CI) it uses rustup's target plus Debian's cross gcc, with
# the linker and runner set in .cargo/config.toml, installing the Debian
# packages when it can (root or sudo).
#
# --release builds the size-optimized `dist` profile (fat LTO,
# codegen-units=1, stripped). --cpu sets -C target-cpu (see targets/*.toml);
# the default is the triple's baseline, which runs on every board.
# --nnef-only leaves out the ONNX front end (the agent's `onnx` feature):
# a smaller agent that loads NNEF bundles only (`fleetctl bundle pack --nnef`).
# Prints the binary's path and size. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
target=$1
shift
profile=dev
cpu=""
features=()
while [ $# -gt 0 ]; do
  case $1 in
    --release) profile=dist ;;
    --cpu) cpu=$2; shift ;;
    --nnef-only) features=(--no-default-features) ;;
    *) usage ;;
  esac
  shift
done

if [ "$target" = all ]; then
  for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl; do
    args=("$t")
    [ "$profile" = dist ] && args+=(--release)
    [ "${#features[@]}" -gt 0 ] && args+=(--nnef-only)
    "$0" "${args[@]}"
  done
  exit 0
fi

case $target in
  aarch64-unknown-linux-gnu) pkgs=(gcc-aarch64-linux-gnu qemu-user-static) ;;
  armv7-unknown-linux-gnueabihf) pkgs=(gcc-arm-linux-gnueabihf qemu-user-static) ;;
  # rust-lld links musl statically; gcc is only needed for C code in deps.
  aarch64-unknown-linux-musl) pkgs=(gcc-aarch64-linux-gnu qemu-user-static) ;;
  *) echo "unknown target $target" >&2; usage ;;
esac

engine_ok() {
  for e in docker podman; do
    command -v "$e" >/dev/null 2>&1 && "$e" info >/dev/null 2>&1 && return 0
  done
  return 1
}

rustflags="${RUSTFLAGS:-}"
if [ "$target" = aarch64-unknown-linux-musl ]; then
  # C dependencies (zstd) compile with the gnu cross gcc; rust-lld links
  # them against Rust's bundled musl, fully static.
  export CC_aarch64_unknown_linux_musl="${CC_aarch64_unknown_linux_musl:-aarch64-linux-gnu-gcc}"
fi
[ -n "$cpu" ] && rustflags="$rustflags -C target-cpu=$cpu"

if command -v cross >/dev/null 2>&1 && engine_ok; then
  echo "==> cross (container engine found) for $target, profile $profile"
  RUSTFLAGS="$rustflags" cross build --locked -p edge-agent --bin edge-agent "${features[@]}" \
    --target "$target" --profile "$profile"
else
  missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then sudo_cmd=""; elif command -v sudo >/dev/null; then sudo_cmd=sudo; else
      echo "missing Debian packages: ${missing[*]}" >&2
      echo "run: apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
    echo "==> installing ${missing[*]}"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
  fi
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
  # Shipped gnu builds link with the toolchain's lld and pack relative
  # relocations (DT_RELR: 0.9 MB less on aarch64). Debian 12's binutils
  # 2.40 ignores -z pack-relative-relocs on ARM; glibc 2.36, which the
  # package already depends on, applies them. Only the agent's own link
  # changes (`cargo rustc`), so dependencies stay cached.
  link_args=()
  gcc_ld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld"
  if [ "$profile" = dist ] && [[ $target == *-gnu* ]] && [ -x "$gcc_ld/ld.lld" ]; then
    link_args=(-C "link-arg=-B$gcc_ld" -C link-arg=-fuse-ld=lld -C link-arg=-Wl,-z,pack-relative-relocs)
  fi
  echo "==> cargo (rustup target + Debian cross gcc) for $target, profile $profile"
  RUSTFLAGS="$rustflags" cargo rustc --locked -p edge-agent --bin edge-agent "${features[@]}" \
    --target "$target" --profile "$profile" -- "${link_args[@]}"
fi

dir=$profile
[ "$profile" = dev ] && dir=debug
bin="${CARGO_TARGET_DIR:-target}/$target/$dir/edge-agent"
[ -x "$bin" ] || { echo "no binary at $bin" >&2; exit 1; }
size=$(stat -c %s "$bin")
variant=full
[ "${#features[@]}" -gt 0 ] && variant=nnef-only
echo "built $bin ($variant, $size bytes, $((size / 1024 / 1024)) MiB)"
