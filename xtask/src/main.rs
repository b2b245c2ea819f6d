//! Repository automation, run as `cargo xtask <task>`.
//!
//! It links none of the workspace crates: `search` and `transfer-imagenet` run `cargo`
//! (from `$CARGO`) as a user would, so they always build what the user builds.
//! Tasks: `search` (the main job: builds `nas` in release and runs `nas search` with the
//! arguments given), `transfer-imagenet` (the same for `nas transfer`) and `ci` (runs
//! `.ci/run`, CI's entry point, so that CI and this task share one list of checks).

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
  ci    run `.ci/run`, CI's own entry point, from the workspace root: rustfmt, clippy
        (warnings are errors), rustdoc, nas-space without default features, the whole
        test suite, the `cuda` feature's build without a GPU (installs the CUDA compiler
        from PyPI under ~/.cache) and the Slurm tests on a single-node cluster (installs
        Debian's Slurm packages with apt-get and starts its daemons: needs root)";

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
    cargo(&["build", "--release", "--package", "nas-cli", "--bin", "nas"])?;
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

/// Runs `.ci/run`, the script CI calls, from the workspace root: one list of checks, so
/// this task cannot drift from CI.
fn ci() -> Result<()> {
    let root = workspace_root()?;
    eprintln!("$ bash .ci/run");
    let status = Command::new("bash")
        .arg(root.join(".ci").join("run"))
        .current_dir(&root)
        .status()
        .context("while starting `bash .ci/run`")?;
    if !status.success() {
        bail!("`.ci/run` failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("while starting `{cargo}`"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
