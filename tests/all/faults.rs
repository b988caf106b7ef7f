//! Faults of the machine under a running server (SQLite, the embedded store): a full disk
//! costs the writes that hit it and nothing after; a database file deleted or replaced under
//! the server stops it acknowledging writes instead of losing them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, plugin_set, tempdir, Server};

/// A small tmpfs the test owns, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where this machine lets the test mount nothing (not root).
    fn mount(size: &str) -> Option<Self> {
        let dir = tempdir("tmpfs");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Self(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `dir` to the last byte, then frees `spare` bytes of it.
fn fill(dir: &Path, spare: u64) -> std::fs::File {
    let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![7u8; 64 << 10];
    let mut written = 0u64;
    while filler.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    let _ = filler.flush();
    filler.set_len(written.saturating_sub(spare)).unwrap();
    filler
}

#[tokio::test]
async fn a_full_disk_fails_the_writes_that_hit_it_and_writes_resume_when_space_returns() {
    let Some(disk) = Tmpfs::mount("24m") else {
        eprintln!(
            "SKIPPED a_full_disk_...: this machine cannot mount a tmpfs (mount needs root); \
             the disk-full behaviour is untested here"
        );
        return;
    };
    let data = disk.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start_with(
        &plugin_set(&["account-balance"], &[]),
        &data,
        &[("PROJECTOR_RUNNER__MAX_RETRY_BACKOFF_MS", "200")],
    );
    let api = server.api();
    let accounts: Vec<String> = (0..8).map(|i| format!("acct-{i}")).collect();
    for account in &accounts {
        api.open_account(account, "owner").await;
    }
    // What the server acknowledged, per account: the read model must end up equal to it.
    let mut deposits: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    let memo = "m".repeat(4 << 10);

    let filler = fill(&disk.0, 1 << 20);
    let mut refused = 0;
    let mut n = 0i64;
    while refused < 5 {
        n += 1;
        assert!(n < 100_000, "the disk never filled up");
        let account = &accounts[n as usize % accounts.len()];
        let (status, body) = api
            .post(
                "/events",
                &json!({"stream": account, "stream_type": "Account", "type": "Deposited",
                        "payload": {"amount": n, "memo": memo}}),
            )
            .await;
        match status {
            201 => {
                let entry = deposits.entry(account.clone()).or_default();
                entry.0 += n;
                entry.1 += 1;
            }
            503 => refused += 1,
            other => panic!("an append on a full disk answered {other}: {body}"),
        }
    }
    assert!(
        !deposits.is_empty(),
        "not one append fitted before the disk filled"
    );

    // Space comes back: appends and the projection resume by themselves.
    drop(filler);
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let mut last = BTreeMap::new();
    for account in &accounts {
        let (status, body) = eventually(Duration::from_secs(30), || async {
            let (status, body) = api
                .post(
                    "/events",
                    &json!({"stream": account, "stream_type": "Account", "type": "Deposited",
                            "payload": {"amount": 1}}),
                )
                .await;
            match status {
                201 => Ok((status, body)),
                _ => Err(format!(
                    "appends still fail after space returned: {status} {body}"
                )),
            }
        })
        .await;
        assert_eq!(status, 201);
        let entry = deposits.entry(account.clone()).or_default();
        entry.0 += 1;
        entry.1 += 1;
        last.insert(
            account.clone(),
            body["events"][0]["version"].as_u64().unwrap(),
        );
    }
    for account in &accounts {
        let (status, doc) = api
            .get(&format!(
                "/projections/account-balance/accounts/{account}?wait_for={account}@{}&timeout_ms=30000",
                last[account]
            ))
            .await;
        assert_eq!(status, 200, "{doc}");
        let (sum, count) = deposits[account];
        assert_eq!(doc["document"]["balance"], sum, "{account}: {doc}");
        assert_eq!(doc["document"]["tx_count"], count, "{account}: {doc}");
    }
}

/// Deleting or replacing the database file under the server: every later append is refused
/// (none acknowledged into a file no path names), and `/readyz` says why.
#[tokio::test]
async fn a_database_file_deleted_or_replaced_under_the_server_stops_it_acknowledging_writes() {
    for how in ["deleted", "replaced"] {
        let data = tempdir("lost");
        let server = Server::start_with(&plugin_set(&["account-balance"], &[]), &data, &[]);
        let api = server.api();
        api.open_account("acct-1", "owner").await;
        let file = data.join("projector.db");
        match how {
            "deleted" => std::fs::remove_file(&file).unwrap(),
            _ => {
                let other = data.join("other.db");
                std::fs::write(&other, b"").unwrap();
                std::fs::rename(&other, &file).unwrap();
            }
        }
        // The first append after it may race the check; none after the server noticed.
        let body = eventually(Duration::from_secs(10), || async {
            let (status, body) = api
                .post(
                    "/events",
                    &json!({"stream": "acct-1", "stream_type": "Account", "type": "Deposited",
                            "payload": {"amount": 1}}),
                )
                .await;
            match status {
                503 => Ok(body),
                _ => Err(format!("{how}: an append answered {status}: {body}")),
            }
        })
        .await;
        assert_eq!(body["error"]["code"], "database_file_lost", "{how}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(how),
            "{how}: {body}"
        );
        for _ in 0..3 {
            let (status, body) = api
                .post(
                    "/events",
                    &json!({"stream": "acct-2", "stream_type": "Account", "type": "AccountOpened",
                            "payload": {"owner": "o", "currency": "EUR"}}),
                )
                .await;
            assert_eq!(status, 503, "{how}: an append was acknowledged: {body}");
        }
        let (status, ready) = api.get("/readyz").await;
        assert_eq!(status, 503, "{how}: {ready}");
        assert!(ready.to_string().contains(how), "{how}: {ready}");
        let log = std::fs::read_to_string(data.join("server.log")).unwrap();
        assert!(log.contains("database file is gone"), "{how}: {log}");
        assert!(
            log.contains("/proc/"),
            "{how}: the log should say where the open file is: {log}"
        );
    }
}
