//! `scap generate`: the man pages and shell completions the Debian package
//! ships, made from the command line's own definitions, so they never say
//! other than `--help` does. Hidden from `--help`: `scripts/deb` runs it.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Subcommand};

use super::output::exit;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Write scap.1 and a scap-SUBCOMMAND.1 for every subcommand into DIR
    Man { dir: PathBuf },
    /// Print the completion script for SHELL (bash, zsh, fish, ...)
    Completions { shell: clap_complete::Shell },
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<i32> {
    let mut cmd = super::Cli::command();
    match a.what {
        What::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .map_err(|e| anyhow::anyhow!("writing man pages into {}: {e}", dir.display()))?;
        }
        What::Completions { shell } => {
            clap_complete::generate(shell, &mut cmd, "scap", &mut std::io::stdout());
        }
    }
    Ok(exit::OK)
}
