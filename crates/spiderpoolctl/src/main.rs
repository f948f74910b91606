//! `spiderpoolctl`: apply, get and delete Spiderpool and plain Kubernetes objects in a datastore,
//! with kubectl's output conventions.

mod args;
mod commands;
mod print;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    // Completions need no datastore.
    if let args::Command::Completion { shell } = args.command {
        let mut cmd = <args::Args as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "spiderpoolctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
