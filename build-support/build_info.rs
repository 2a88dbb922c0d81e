// Shared by the agent's and the fleet server's build scripts (`#[path]`):
// the git commit and the target triple, for `--version` and build_info.

/// Sets `EDGEFLEET_GIT_COMMIT` (12 hex digits, `unknown` outside a git
/// checkout) and `EDGEFLEET_TARGET` for the crate being built.
pub fn emit() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EDGEFLEET_GIT_COMMIT={commit}");
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=EDGEFLEET_TARGET={target}");
    // A new commit moves HEAD's branch ref (or HEAD itself when detached).
    let git = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.git");
    for p in ["HEAD", "refs/heads", "packed-refs"] {
        let p = git.join(p);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
