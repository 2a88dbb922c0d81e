//! Build metadata for `--version` (git commit, target triple).

#[path = "../build-support/build_info.rs"]
mod build_info;

fn main() {
    build_info::emit();
}
