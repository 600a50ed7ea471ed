//! `tracer completions` and `tracer man`: the shell completion scripts and the manual pages,
//! generated from the flag definitions in [`crate::cli`] so that they never drift from them.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::Cli;

/// Prints the completion script of `shell` on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tracer", &mut out);
    write_stdout(&out)
}

/// Prints `tracer.1` on stdout, or writes it and a page per command (`tracer-watch.1`, ...)
/// into `dir`.
pub fn man(dir: Option<&Path>) -> Result<()> {
    let command = Cli::command();
    let Some(dir) = dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(command).render(&mut out)?;
        return write_stdout(&out);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
    Ok(())
}

/// Writes `bytes` to stdout; a closed pipe (`tracer man | head`) is no error.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}
