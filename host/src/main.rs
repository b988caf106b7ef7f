use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use projector::runtime::{Limits, Runtime, RuntimeConfig};

/// Runs event-sourcing projections as sandboxed WebAssembly plugins.
#[derive(Parser)]
#[command(name = "projector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a plugin over a JSONL file of events in memory and print the read model as JSON.
    Replay {
        /// The plugin component (.wasm).
        #[arg(long)]
        plugin: PathBuf,
        /// Events, one JSON object per line (the fields of `POST /events`).
        #[arg(long)]
        events: PathBuf,
        /// Write the read model here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Events per `handle` call.
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// Cache for compiled plugins.
        #[arg(
            long,
            env = "PROJECTOR_CACHE_DIR",
            default_value = "projector-data/cache"
        )]
        cache_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROJECTOR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Replay {
            plugin,
            events,
            out,
            batch_size,
            cache_dir,
        } => {
            let runtime = Runtime::new(RuntimeConfig {
                limits: Limits::default(),
                cache_dir: Some(cache_dir),
            })?;
            let plugin = runtime.load_file(&plugin)?;
            let model = projector::replay::replay(&plugin, &events, batch_size)?;
            let mut json = serde_json::to_string_pretty(&model)?;
            json.push('\n');
            match out {
                Some(path) => std::fs::write(&path, json)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{json}"),
            }
        }
    }
    Ok(())
}
