//! The seed scenario: an import that reads its own writes. Each read names the version it
//! just wrote and must see it; none may time out.

use std::collections::HashMap;

use serde_json::json;

use crate::support::{on_both_stores, plugin_set, Server};

on_both_stores! {
    async fn every_read_sees_its_own_write_and_none_times_out(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let mut balances: HashMap<String, i64> = HashMap::new();
        for a in 0..100 {
            let id = format!("acct-{a}");
            let (version, _) = api.open_account(&id, &format!("o{a}")).await;
            let (status, body) = api
                .get(&format!(
                    "/projections/account-balance/accounts/{id}?wait_for={id}@{version}"
                ))
                .await;
            assert_eq!(status, 200, "{id}: {body}");
            assert_eq!(body["document"]["owner"], format!("o{a}"));
            balances.insert(id, 0);
        }
        for op in 0..1000u64 {
            let id = format!("acct-{}", (op * 37) % 100);
            let (kind, delta) = if op % 4 == 3 {
                ("Withdrawn", -3i64)
            } else {
                ("Deposited", 7)
            };
            let (version, _) = api.append(&id, kind, json!({"amount": delta.abs()})).await;
            *balances.get_mut(&id).unwrap() += delta;
            let (status, body) = api
                .get(&format!(
                    "/projections/account-balance/accounts/{id}?wait_for={id}@{version}"
                ))
                .await;
            assert_eq!(status, 200, "op {op} {id}: {body}");
            assert_eq!(
                body["document"]["balance"], balances[&id],
                "op {op} {id}: {body}"
            );
            assert_eq!(body["document"]["last_version"], version);
        }
    }
}
