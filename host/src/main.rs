use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

mod ops;

use projector::config::Config;
use projector::runtime::{Limits, Runtime, RuntimeConfig};

/// Runs event-sourcing projections as sandboxed WebAssembly plugins.
#[derive(Parser)]
#[command(name = "projector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// On an error, print its debug form (and a backtrace, with RUST_BACKTRACE=1).
    #[arg(long, global = true)]
    debug: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline and the HTTP API. With no options: SQLite in ./projector-data/, the
    /// plugins in ./target/plugins/, on 127.0.0.1:8080.
    Serve(ServeArgs),
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
        /// Go on past bad lines and events the plugin fails on: report each, print the
        /// partial read model, exit with 2.
        #[arg(long)]
        keep_going: bool,
    },
    /// Write a new plugin crate NAME (a projection; `--observer` for an observer) that builds
    /// and tests as written.
    New {
        name: String,
        /// An observer (side effects as data) instead of a projection.
        #[arg(long)]
        observer: bool,
        /// The folder to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The SDK crate's folder [env: PROJECTOR_SDK] (default: this projector's checkout, or
        /// the published crate).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// What runs on a server: projections and observers, status, lag, parked, dead letters.
    Status {
        #[command(flatten)]
        remote: Remote,
    },
    /// A projection's (or observer's) dead letters: list them, retry or skip one.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// The plugins a server runs: list them, upload one (swap or rebuild).
    #[command(subcommand)]
    Plugins(Plugins),
    /// Build a plugin crate into a component (adds the wasm32-wasip2 target if missing); print
    /// its path, size and what it declares.
    Build {
        /// The crate's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Cache for compiled plugins.
        #[arg(
            long,
            env = "PROJECTOR_CACHE_DIR",
            default_value = "projector-data/cache"
        )]
        cache_dir: PathBuf,
    },
}

/// Every option is also a setting in the config file and a `PROJECTOR_*` variable
/// (flags win over variables, variables over the file).
#[derive(Args)]
struct ServeArgs {
    /// TOML config file; every setting is in the README
    #[arg(long, env = "PROJECTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [setting: listen; env: PROJECTOR_LISTEN] (default 127.0.0.1:8080)
    #[arg(long)]
    listen: Option<String>,
    /// Data directory [setting: data_dir; env: PROJECTOR_DATA_DIR] (default ./projector-data)
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Database URL, sqlite://FILE [setting: database_url; env: PROJECTOR_DATABASE_URL]
    /// (default sqlite://<data_dir>/projector.db)
    #[arg(long)]
    database_url: Option<String>,
    /// Folder whose *.wasm plugins are loaded [setting: plugins; env: PROJECTOR_PLUGINS]
    /// (default ./target/plugins)
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Deploy a plugin file again whenever it changes: same version swaps, a new version
    /// rebuilds [setting: watch_plugins; env: PROJECTOR_WATCH_PLUGINS]
    #[arg(long)]
    watch: bool,
}

/// Errors are printed once, cause by cause without repeats, and without a backtrace unless
/// `--debug`.
/// Which server, as whom, and how to print.
#[derive(Args)]
struct Remote {
    /// The server's base URL.
    #[arg(long, env = "PROJECTOR_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The admin token (for retry, skip and plugin commands).
    #[arg(long, env = "PROJECTOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Oldest first.
    List {
        name: String,
        /// NAME is an observer: its dead actions.
        #[arg(long)]
        observer: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run it again (a projection's: by position; an observer's action: by id).
    Retry {
        name: String,
        target: String,
        #[arg(long)]
        observer: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Pass over it: its stream goes on.
    Skip {
        name: String,
        target: String,
        #[arg(long)]
        observer: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum Plugins {
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Same version: a swap; a new one: a rebuild beside the serving one.
    Upload {
        file: PathBuf,
        /// The name to deploy it as (default: what the component calls itself).
        #[arg(long)]
        name: Option<String>,
        /// A rebuild waits for `activate` instead of cutting over by itself.
        #[arg(long)]
        manual: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Runs one client command of the operator's terminal and prints what it returns.
fn remote<F, Fut>(remote: &Remote, run: F) -> anyhow::Result<std::process::ExitCode>
where
    F: FnOnce(ops::Client, bool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    let client = ops::Client::new(&remote.url, remote.token.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let out = runtime.block_on(run(client, remote.json))?;
    println!("{}", out.trim_end());
    Ok(std::process::ExitCode::SUCCESS)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let debug = cli.debug;
    match run(cli) {
        Ok(code) => code,
        Err(err) if debug => {
            eprintln!("error: {err:?}");
            std::process::ExitCode::FAILURE
        }
        Err(err) => {
            let mut text = err.to_string();
            for cause in err.chain().skip(1) {
                let cause = cause.to_string();
                if !text.contains(&cause) {
                    text.push_str(": ");
                    text.push_str(&cause);
                }
            }
            eprintln!("error: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("PROJECTOR_LOG")
            .unwrap_or_else(|_| "info".into())
    };
    // A log that cannot be written (its disk full) must cost the log line, not the task that
    // logged it: tracing-subscriber would otherwise report the failure with `eprintln!`, which
    // panics when stderr fails too, taking a request's connection or a runner with it.
    match std::env::var("PROJECTOR_LOG_FORMAT").as_deref() {
        // One JSON object per line, with the fields of the spans it is in (the projection and
        // version of a runner's line, the request id of a request's).
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init(),
        Ok("text") | Err(_) => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init(),
        Ok(other) => {
            anyhow::bail!("PROJECTOR_LOG_FORMAT={other:?}: use `text` (the default) or `json`")
        }
    }
    match cli.command {
        Command::Serve(args) => serve(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Replay {
            plugin,
            events,
            out,
            batch_size,
            cache_dir,
            keep_going,
        } => {
            let runtime = Runtime::new(RuntimeConfig {
                limits: Limits::default(),
                cache_dir: Some(cache_dir),
                ..Default::default()
            })?;
            let plugin = runtime.load_file(&plugin)?;
            let mut replayed =
                projector::replay::replay_with(&plugin, &events, batch_size, keep_going)?;
            if !keep_going && !replayed.failures.is_empty() {
                return Err(replayed.failures.remove(0).into());
            }
            let mut json = serde_json::to_string_pretty(&replayed.model)?;
            json.push('\n');
            match out {
                Some(path) => std::fs::write(&path, json)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{json}"),
            }
            if keep_going && !replayed.failures.is_empty() {
                for failure in &replayed.failures {
                    eprintln!("error: {failure}");
                }
                eprintln!(
                    "{} events or lines left out; the read model above is without them",
                    replayed.failures.len()
                );
                return Ok(std::process::ExitCode::from(2));
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::New {
            name,
            observer,
            dir,
            sdk,
        } => {
            let sdk = match sdk {
                Some(path) => projector::author::Sdk::Path(
                    path.canonicalize()
                        .with_context(|| format!("the SDK folder {}", path.display()))?,
                ),
                None => projector::author::Sdk::locate(),
            };
            let created = projector::author::new_plugin(&dir, &name, observer, &sdk)?;
            println!(
                "created {} ({}); next: cd {} && cargo test && projector build",
                created.display(),
                if observer {
                    "an observer"
                } else {
                    "a projection"
                },
                created.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Status { remote: r } => {
            remote(&r, |c, json| async move { ops::status(&c, json).await })
        }
        Command::DeadLetters(DeadLetters::List {
            name,
            observer,
            limit,
            remote: r,
        }) => remote(&r, |c, json| async move {
            ops::dead_letters(&c, &name, observer, limit, json).await
        }),
        Command::DeadLetters(DeadLetters::Retry {
            name,
            target,
            observer,
            remote: r,
        }) => remote(&r, |c, json| async move {
            ops::resolve(&c, &name, &target, observer, "retry", json).await
        }),
        Command::DeadLetters(DeadLetters::Skip {
            name,
            target,
            observer,
            remote: r,
        }) => remote(&r, |c, json| async move {
            ops::resolve(&c, &name, &target, observer, "skip", json).await
        }),
        Command::Plugins(Plugins::List { remote: r }) => {
            remote(&r, |c, json| async move { ops::plugins(&c, json).await })
        }
        Command::Plugins(Plugins::Upload {
            file,
            name,
            manual,
            remote: r,
        }) => remote(&r, |c, json| async move {
            ops::upload(&c, &file, name, manual, json).await
        }),
        Command::Build { dir, cache_dir } => {
            let built = projector::author::build_plugin(&dir, Some(cache_dir))?;
            let d = built.plugin.descriptor();
            let info = built.plugin.info();
            println!("{}", built.path.display());
            println!(
                "  {} bytes, world {}, contract {}, sha256 {}",
                built.bytes, info.world, info.contract, info.sha256
            );
            println!("  {} {}", d.name, d.version);
            println!(
                "  events: {}",
                if d.event_types.is_empty() {
                    "all".to_owned()
                } else {
                    d.event_types.join(", ")
                }
            );
            for c in &d.collections {
                println!(
                    "  collection {} (indexed: {})",
                    c.name,
                    c.indexes.join(", ")
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(url) = args.database_url {
        config.database_url = url;
    }
    if let Some(dir) = args.plugins {
        config.plugins.dir = dir;
    }
    if args.watch {
        config.watch_plugins = true;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        projector::serve::serve(
            config,
            |addr| {
                // Scripts and tests read this line to find the port (e.g. with --listen :0).
                println!("projector listening on http://{addr}");
                let _ = std::io::stdout().flush();
            },
            shutdown_signal(),
        )
        .await
    })?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
