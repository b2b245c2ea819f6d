//! Repository automation, run as `cargo xtask <task>`.
//!
//! It links none of the workspace crates: each task runs `cargo` (from `$CARGO`) as a
//! user would, so it always builds what the user builds.
//! Tasks today: `ci`. The main jobs (`search`, `transfer-imagenet`) arrive with the
//! search and transfer issues.

use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  ci    the checks CI runs: rustfmt, clippy (warnings are errors), rustdoc, the
        dependency-light build of nas-space, and the whole test suite";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{USAGE}"),
    }
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
