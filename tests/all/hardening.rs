//! Faults and clients of real deployments (issue 17, items 3 and 4): a second server on the same
//! SQLite data dir, clients that open connections and send nothing (or too little, too slowly),
//! idle keep-alive connections, more connections than file descriptors.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{eventually, plugin_set, tempdir, Backend, Server};

/// The `host:port` of a server's base URL.
fn addr(server: &Server) -> String {
    server
        .base
        .strip_prefix("http://")
        .expect("an http:// base")
        .to_owned()
}

/// Reads (and drops) whatever arrives until the server closes the connection (EOF or a reset);
/// returns how long that took, or an error if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + within).into(), stream.read(&mut buf)).await {
            Err(_) => return Err(format!("connection still open after {within:?}")),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One HTTP/1.1 GET on `stream`, keeping the connection open; returns status and body.
async fn get_on(stream: &mut TcpStream, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf).await.expect("read the response");
        assert!(n > 0, "connection closed before a response to {path}");
        received.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    while received.len() < head_end + length {
        let n = stream.read(&mut buf).await.expect("read the body");
        assert!(n > 0, "connection closed in the body of {path}");
        received.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&received[head_end..head_end + length]).to_string();
    (status, body)
}

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

/// On PostgreSQL several instances on one database is the design (leases decide who runs
/// what), and the data dir holds only the compiled-plugin cache: no lock, so instances started
/// from one folder both run.
#[tokio::test]
async fn instances_on_one_postgres_database_may_share_a_data_dir() {
    let backend = Backend::postgres().await;
    let plugins = plugin_set(&["account-balance"], &[]);
    let data = tempdir("pg-shared");
    let first = Server::start_on(&backend, &plugins, &data, &[]);
    let second = Server::start_on(&backend, &plugins, &data, &[]);
    for server in [&first, &second] {
        let (status, body) = server.api().get("/healthz").await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(!data.join("projector.lock").exists());
}

/// A client that connects and sends nothing, half a request head, or a head one byte at a
/// time, is closed once `http.header_read_timeout_ms` has passed since the accept.
#[tokio::test]
async fn a_client_that_does_not_send_its_headers_in_time_is_closed() {
    let data = tempdir("header-timeout");
    let server = Server::start_with(
        &plugin_set(&[], &[]),
        &data,
        &[("PROJECTOR_HTTP__HEADER_READ_TIMEOUT_MS", "300")],
    );
    // Well beyond the 300 ms configured: a slow machine only makes the close later, never
    // the assertion wrong.
    let within = Duration::from_secs(10);

    let mut silent = TcpStream::connect(addr(&server)).await.unwrap();
    closed_within(&mut silent, within)
        .await
        .expect("a silent connection is closed");

    let mut half = TcpStream::connect(addr(&server)).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    closed_within(&mut half, within)
        .await
        .expect("a connection that sent half a head is closed");

    // Slowloris: a byte every 50 ms never lets the head complete; each byte must not restart
    // the timeout.
    let mut dribble = TcpStream::connect(addr(&server)).await.unwrap();
    let start = Instant::now();
    let endless = b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut next = 0;
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            start.elapsed() < within,
            "a connection sending its head a byte at a time is still open after {within:?}"
        );
        tokio::select! {
            read = dribble.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let byte = endless[next % endless.len()];
                next += 1;
                if dribble.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
        }
    }

    // A client that does send its request is served as before.
    let mut prompt = TcpStream::connect(addr(&server)).await.unwrap();
    let (status, body) = get_on(&mut prompt, "/healthz").await;
    assert_eq!(status, 200, "{body}");
}

/// A keep-alive connection serves several requests, then is closed after
/// `http.idle_timeout_ms` without one; a read that waits longer than that is no idle
/// connection and gets its answer.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_but_a_long_wait_is_answered() {
    let data = tempdir("idle-timeout");
    let server = Server::start_with(
        &plugin_set(&["account-balance"], &[]),
        &data,
        &[
            ("PROJECTOR_HTTP__IDLE_TIMEOUT_MS", "1000"),
            // Far beyond the test: only the idle timeout can close the connection.
            ("PROJECTOR_HTTP__HEADER_READ_TIMEOUT_MS", "60000"),
        ],
    );

    let mut conn = TcpStream::connect(addr(&server)).await.unwrap();
    let (status, _) = get_on(&mut conn, "/healthz").await;
    assert_eq!(status, 200);
    // Keep-alive still works: the same connection takes a second request.
    let (status, _) = get_on(&mut conn, "/readyz").await;
    assert_eq!(status, 200);
    let took = closed_within(&mut conn, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection is closed");
    eprintln!("idle connection closed after {took:?}");

    // A read waiting for a version that is appended after two idle timeouts and more.
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let address = addr(&server);
    let waiting = tokio::spawn(async move {
        let mut conn = TcpStream::connect(address).await.unwrap();
        let answer = get_on(
            &mut conn,
            "/projections/account-balance/accounts/acct-1?wait_for=acct-1@2&timeout_ms=20000",
        )
        .await;
        (answer, conn)
    });
    read_waiting(&api).await;
    // The duration under test, not a wait for state: the read stays in flight for longer
    // than the idle timeout.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(!waiting.is_finished(), "the read did not wait");
    api.append("acct-1", "Deposited", serde_json::json!({"amount": 7}))
        .await;
    let ((status, body), mut conn) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting read answers")
        .expect("the waiting read's task");
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["document"]["balance"], 7, "{doc}");
    assert_eq!(doc["version"], 2, "{doc}");
    // After its answer the connection is idle like any other.
    closed_within(&mut conn, Duration::from_secs(10))
        .await
        .expect("the connection is closed once idle");
}

/// Sockets the process `pid` holds.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// More silent connections than the process has file descriptors: before, the server ran out
/// of them (`accept error: Too many open files`) and answered nothing until the clients left.
/// Now at most `http.max_connections` are accepted at once, the rest wait in the listen
/// backlog, and each silent one is closed after the header timeout, so a request on a fresh
/// connection is answered within about (connections ahead of it / max_connections) header
/// timeouts.
#[tokio::test]
async fn silent_connections_beyond_the_fd_limit_neither_exhaust_fds_nor_starve_new_requests() {
    const MAX: usize = 50;
    let data = tempdir("max-connections");
    let server = Server::start_with(
        &plugin_set(&[], &[]),
        &data,
        &[
            ("PROJECTOR_HTTP__HEADER_READ_TIMEOUT_MS", "500"),
            ("PROJECTOR_HTTP__MAX_CONNECTIONS", "50"),
        ],
    );
    // Lower the running server's fd limit so a few hundred sockets exhaust it, as 1,100 did
    // under the default soft limit of 1024.
    let lowered = Command::new("prlimit")
        .arg(format!("--pid={}", server.pid()))
        .arg("--nofile=256:256")
        .status();
    match lowered {
        Ok(status) => assert!(status.success(), "prlimit failed: {status}"),
        Err(err) => {
            eprintln!("skipped: prlimit (util-linux) is not available: {err}");
            return;
        }
    }

    // The listener and the process's own (tokio's signal pipe is a socket pair).
    let baseline = sockets_of(server.pid());
    let mut silent = Vec::new();
    for n in 0..400 {
        let connect = TcpStream::connect(addr(&server));
        match tokio::time::timeout(Duration::from_secs(20), connect).await {
            Ok(Ok(conn)) => silent.push(conn),
            Ok(Err(err)) => panic!("connection {n}: {err}"),
            Err(_) => {
                panic!("connection {n} not even queued within 20 s: the server stopped accepting")
            }
        }
    }

    let address = addr(&server);
    let healthz = tokio::spawn(async move {
        let mut conn = TcpStream::connect(address).await.unwrap();
        get_on(&mut conn, "/healthz").await
    });
    let mut most_sockets = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthz.is_finished() {
        most_sockets = most_sockets.max(sockets_of(server.pid()));
        assert!(
            Instant::now() < deadline,
            "/healthz on a fresh connection not answered within 30 s (the server held up to {most_sockets} sockets)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = healthz.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        most_sockets <= baseline + MAX,
        "the server held {most_sockets} sockets, above max_connections {MAX} + the {baseline} it had before"
    );
    // Every silent connection was closed by the server, none left to linger.
    for mut conn in silent {
        closed_within(&mut conn, Duration::from_secs(30))
            .await
            .expect("each silent connection is closed");
    }
    let log = std::fs::read_to_string(data.join("server.log")).unwrap();
    assert!(!log.contains("Too many open files"), "{log}");
}

/// `Max open files` of `/proc/{pid}/limits`: (soft, hard).
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-files line in {limits}"));
    let mut values = line["Max open files".len()..].split_whitespace();
    (
        values.next().unwrap().to_owned(),
        values.next().unwrap().to_owned(),
    )
}

/// A soft fd limit below the hard one (1024 is a common soft default) is raised at start.
#[tokio::test]
async fn the_soft_fd_limit_is_raised_to_the_hard_limit_at_start() {
    if Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipped: prlimit (util-linux) is not available");
        return;
    }
    let data = tempdir("fd-limit");
    let server = Server::start_under(
        &["prlimit", "--nofile=256:4096", "--"],
        &plugin_set(&[], &[]),
        &data,
        &[],
    );
    // The server raised it before it listened, so before `start_under` returned.
    assert_eq!(
        open_files_limit(server.pid()),
        ("4096".into(), "4096".into()),
        "(soft, hard) open files of the server"
    );
    let log = std::fs::read_to_string(data.join("server.log")).unwrap();
    assert!(
        log.contains("was=256") && log.contains("soft=4096") && log.contains("hard=4096"),
        "the log names the limits: {log}"
    );
}

/// SIGTERM, as before the server had its own accept loop: new connections are refused, an idle
/// one is closed, a request in flight is answered, then the process exits 0.
#[tokio::test]
async fn sigterm_answers_the_request_in_flight_then_exits() {
    let data = tempdir("shutdown");
    let mut server = Server::start_with(&plugin_set(&["account-balance"], &[]), &data, &[]);
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let mut idle = TcpStream::connect(addr(&server)).await.unwrap();
    let (status, _) = get_on(&mut idle, "/healthz").await;
    assert_eq!(status, 200);
    let address = addr(&server);
    let waiting = tokio::spawn(async move {
        let mut conn = TcpStream::connect(address).await.unwrap();
        get_on(
            &mut conn,
            "/projections/account-balance/accounts/acct-1?wait_for=acct-1@2&timeout_ms=3000",
        )
        .await
    });
    // The read is in flight (waiting for its version) before the signal.
    read_waiting(&api).await;
    let signalled = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());

    closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("the idle connection is closed at shutdown");
    let address = addr(&server);
    eventually(Duration::from_secs(10), || {
        let address = address.clone();
        async move {
            match TcpStream::connect(address).await {
                Err(_) => Ok(()),
                Ok(_) => Err("still accepting connections".to_owned()),
            }
        }
    })
    .await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the read in flight is answered")
        .unwrap();
    assert_eq!(status, 504, "{body}");
    let exited = eventually(Duration::from_secs(30), || {
        let exited = server.try_wait();
        async move { exited.ok_or_else(|| "still running".to_owned()) }
    })
    .await;
    assert!(exited.success(), "{exited}");
}

/// Returns once the server holds one read waiting for a version to be appended.
async fn read_waiting(api: &crate::support::Api) {
    eventually(Duration::from_secs(20), || async {
        match api.gauge("projector_reads_waiting_for_append").await? {
            n if n >= 1.0 => Ok(()),
            _ => Err("the read is not waiting at the server".to_owned()),
        }
    })
    .await;
}
