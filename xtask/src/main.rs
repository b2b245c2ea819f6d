//! Repository automation, run as `cargo xtask <task>`.
//!
//! It links none of the workspace crates: each task runs `cargo` (from `$CARGO`) as a
//! user would, so it always builds what the user builds.
//! Tasks: `search` (the main job: builds `nas` in release and runs `nas search` with the
//! arguments given), `transfer-imagenet` (the same for `nas transfer`) and `ci`.

use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <task> [args]

tasks:
  search [ARGS]  build `nas` (release) and run `nas search ARGS`: a real search on the
                 built-in data by default (about ten minutes on 2 cores); see
                 `cargo xtask search --help` for --strategy, --children, --workers, --data,
                 --out, --resume, --seed
  transfer-imagenet [ARGS]
                 build `nas` (release) and run `nas transfer ARGS`: the best cell of the
                 latest search (or --cell) in the ImageNet skeleton, trained with the
                 ImageNet recipe on --data DIR, or on the built-in data written as 64×64
                 JPEGs (about ten minutes on 2 cores); see `--help`
  ci    the checks CI runs: rustfmt, clippy (warnings are errors), rustdoc, the
        dependency-light build of nas-space, and the whole test suite";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("search") => nas("search", &args[1..]),
        Some("transfer-imagenet") => nas("transfer", &args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{USAGE}"),
    }
}

/// Builds the `nas` binary in release and runs `nas VERB` with `args`.
fn nas(verb: &str, args: &[String]) -> Result<()> {
    cargo(&["build", "--release", "--package", "nas-cli", "--bin", "nas"], &[])?;
    let root = workspace_root()?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), std::path::PathBuf::from);
    let nas = target.join("release").join(format!("nas{}", std::env::consts::EXE_SUFFIX));
    let status = Command::new(&nas)
        .arg(verb)
        .args(args)
        .status()
        .with_context(|| format!("while starting {}", nas.display()))?;
    if !status.success() {
        bail!("`nas {verb}` failed ({status})");
    }
    Ok(())
}

/// The workspace root: xtask's manifest directory's parent.
fn workspace_root() -> Result<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(std::path::Path::to_path_buf).context("xtask has no parent directory")
}

/// The same steps as `.ci/run`, in the same order.
fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"], &[])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    cargo(&["doc", "--workspace", "--no-deps"], &[("RUSTDOCFLAGS", "-D warnings")])?;
    cargo(&["test", "-p", "nas-space", "--no-default-features"], &[])?;
    cargo(&["test", "--workspace"], &[])
}

fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("while starting `{cargo}`"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
