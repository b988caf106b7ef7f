//! Faults and clients of real deployments (issue 17, items 3 and 4): a second server on the same
//! SQLite data dir, clients that open connections and send nothing (or too little, too slowly),
//! idle keep-alive connections, more connections than file descriptors.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{plugin_set, tempdir, Server};

/// Waits for `child` to exit, killing it and failing if it is still running after `within`.
async fn exit_status(
    child: &mut std::process::Child,
    within: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait().expect("poll the child") {
            Some(status) => return status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the second server is still running after {within:?}");
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn serve_command(plugins: &Path, data: &Path, stderr: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--plugins")
        .arg(plugins)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("create the stderr file"));
    command
}

/// Two servers on one SQLite file both ran (fenced checkpoints kept the data right, but each
/// saw the other's writes late). The data dir is locked for the server's life; the lock is
/// the kernel's, so a kill -9 releases it.
#[tokio::test]
async fn a_second_server_on_one_sqlite_data_dir_refuses_to_start_and_names_the_first() {
    let plugins = plugin_set(&[], &[]);
    let data = tempdir("lock");
    let mut first = Server::start_with(&plugins, &data, &[]);

    let stderr = tempdir("lock-second").join("stderr");
    let mut second = serve_command(&plugins, &data, &stderr)
        .spawn()
        .expect("start a second server");
    let status = exit_status(&mut second, Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        !status.success(),
        "the second server exited with {status}: {log}"
    );
    assert!(
        log.contains(&format!("pid {}", first.pid())),
        "the error names the first server's pid {}: {log}",
        first.pid()
    );
    assert!(
        log.contains(&data.join("projector.lock").display().to_string()),
        "the error names the lock file: {log}"
    );
    // The first one never noticed.
    let (status, _) = first.api().get("/healthz").await;
    assert_eq!(status, 200);

    // kill -9: no shutdown code runs, the kernel drops the lock with the process.
    first.kill();
    let again = Server::start_with(&plugins, &data, &[]);
    let (status, _) = again.api().get("/healthz").await;
    assert_eq!(status, 200);
}
