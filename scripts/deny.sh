#!/usr/bin/env bash
# cargo deny check: advisories, bans, licenses, sources (deny.toml).
#
# Advisories come from the RustSec database. Where GitHub is reachable
# cargo-deny fetches the current one; otherwise (CI here has no route to
# GitHub) it uses the snapshot vendored in .ci/rustsec-advisory-db.tar.gz
# (upstream commit bf5c0d2, 2026-08-21; CC0-1.0), which
# scripts/update-advisory-db.sh refreshes. docs/decisions.md explains.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny@0.20.2
# Every platform's crates, so cargo metadata can work offline.
cargo fetch --locked -q
if timeout 10 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  exec cargo deny --locked --config <(sed "s#@ADVISORY_DB@#$HOME/.cargo/advisory-dbs#" deny.toml) \
    check advisories bans licenses sources
fi
db=$(mktemp -d -t edgefleet-advisories.XXXXXX)
trap 'rm -rf "$db"' EXIT
# The folder name cargo-deny derives from the default database URL.
dest="$db/advisory-db-3157b0e258782691"
mkdir -p "$dest"
tar -xzf .ci/rustsec-advisory-db.tar.gz -C "$dest" --strip-components=1
# cargo-deny reads the database's date from git.
(
  cd "$dest"
  git init -q
  git add -A
  GIT_AUTHOR_DATE=2026-08-21T08:28:40+02:00 GIT_COMMITTER_DATE=2026-08-21T08:28:40+02:00 \
    git -c user.name=edgefleet -c user.email=ci@edgefleet.invalid commit -qm "RustSec advisory-db bf5c0d2"
)
echo "cargo deny: GitHub unreachable; advisories from the vendored snapshot of 2026-08-21"
cargo deny --offline --locked --config <(sed "s#@ADVISORY_DB@#$db#" deny.toml) \
  check advisories bans licenses sources
