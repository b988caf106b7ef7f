//! One document per account in collection `accounts`, keyed by the account's stream id.
//!
//! Two features build the variants the host's hot-swap tests upload over this plugin:
//! `same` changes the code but not the name, version or output (it logs a line once per
//! batch); `v2` bumps the version to 2.0.0 and stamps `"schema": 2` on every document, so a
//! read model mixing the two versions shows; `fixed` keeps version 1.0.0 but stamps
//! `"fixed": true` on every document it writes (a fix shipped under the same version, which only
//! a rebuild applies to documents written before).

use projector_sdk::prelude::*;

#[derive(Deserialize)]
struct Opened {
    owner: String,
    currency: String,
}

#[derive(Deserialize)]
struct Amount {
    amount: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Account {
    pub owner: String,
    pub currency: String,
    pub balance: i64,
    pub tx_count: u64,
    pub status: String,
    pub last_version: u64,
    /// The document layout's version; only `v2` writes it.
    #[cfg(feature = "v2")]
    #[serde(default)]
    pub schema: u32,
    /// Only `fixed` writes it.
    #[cfg(feature = "fixed")]
    #[serde(default)]
    pub fixed: bool,
}

/// A new version is rebuilt beside the live read model, so `v2` must say it is another one.
pub const VERSION: &str = if cfg!(feature = "v2") {
    "2.0.0"
} else {
    "1.0.0"
};

#[cfg(feature = "v2")]
const SCHEMA: u32 = 2;

/// `same`: one debug line per batch. Every batch runs in a fresh instance, so a flag in the
/// instance's memory is once per batch.
#[cfg(feature = "same")]
fn log_batch_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        projector_sdk::log::debug("account-balance (variant same): batch started");
    }
}

/// The indexed fields of `accounts`; `reshape` adds one without a new version.
const INDEXES: &[&str] = if cfg!(feature = "reshape") {
    &["owner", "status", "currency"]
} else {
    &["owner", "status"]
};

pub struct AccountBalance;

impl Projection for AccountBalance {
    fn describe() -> Descriptor {
        Descriptor::new("account-balance", VERSION)
            .events(&["AccountOpened", "Deposited", "Withdrawn", "AccountClosed"])
            .collection("accounts", INDEXES)
    }

    fn handle(event: &Event, state: &mut State) -> Result<()> {
        #[cfg(feature = "same")]
        log_batch_once();
        let (id, version) = (&event.stream, event.version);
        let (delta, verb) = match event.event_type.as_str() {
            "AccountOpened" => {
                let Opened { owner, currency } = event.payload()?;
                let status = "open".into();
                let last_version = version;
                let account = Account {
                    owner,
                    currency,
                    status,
                    last_version,
                    #[cfg(feature = "v2")]
                    schema: SCHEMA,
                    #[cfg(feature = "fixed")]
                    fixed: true,
                    ..Default::default()
                };
                state.put("accounts", id, account);
                return Ok(());
            }
            "Deposited" => (event.payload::<Amount>()?.amount, "deposit"),
            "Withdrawn" => (event.payload::<Amount>()?.amount, "withdrawal"),
            _ => (0, ""),
        };
        let opened = state.try_update("accounts", id, |a: &mut Account| {
            // Money must not wrap: a balance past i64's range fails the event, by name.
            let balance = match verb {
                "withdrawal" => a.balance.checked_sub(delta),
                _ => a.balance.checked_add(delta),
            };
            a.balance = balance.ok_or_else(|| {
                Error::msg(format!(
                    "account {id}: a {verb} of {delta} would take the balance {} out of range",
                    a.balance
                ))
            })?;
            a.tx_count += 1;
            a.last_version = version;
            #[cfg(feature = "v2")]
            {
                a.schema = SCHEMA;
            }
            #[cfg(feature = "fixed")]
            {
                a.fixed = true;
            }
            if event.event_type == "AccountClosed" {
                a.status = "closed".into();
            }
            Ok(())
        })?;
        opened
            .then_some(())
            .ok_or_else(|| Error::msg(format!("account {id} was never opened")))
    }
}

projector_sdk::export_projection!(AccountBalance);

#[cfg(test)]
mod tests {
    use super::*;
    use projector_sdk::serde_json::json;
    use projector_sdk::testing::Harness;

    fn opened(h: &mut Harness<AccountBalance>, id: &str) {
        h.emit(
            id,
            "AccountOpened",
            json!({"owner": "alice", "currency": "EUR"}),
        )
        .unwrap();
    }

    #[test]
    fn deposits_and_withdrawals_move_the_balance() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "acct-1");
        let batch = [
            h.event("acct-1", "Deposited", json!({"amount": 100})),
            h.event("acct-1", "Withdrawn", json!({"amount": 30})),
            h.event("acct-1", "Deposited", json!({"amount": 5})),
        ];
        h.apply(&batch).unwrap();
        let account: Account = h.doc("accounts", "acct-1").unwrap();
        assert_eq!(account.balance, 75);
        assert_eq!(account.tx_count, 3);
        assert_eq!(account.last_version, 4);
        assert_eq!(account.status, "open");
    }

    #[test]
    fn closing_marks_the_account_closed() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "acct-1");
        h.emit("acct-1", "AccountClosed", json!({})).unwrap();
        let account: Account = h.doc("accounts", "acct-1").unwrap();
        assert_eq!(account.status, "closed");
        assert_eq!(account.owner, "alice");
    }

    #[test]
    fn accounts_are_independent() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "a");
        opened(&mut h, "b");
        h.emit("a", "Deposited", json!({"amount": 10})).unwrap();
        assert_eq!(h.doc::<Account>("accounts", "a").unwrap().balance, 10);
        assert_eq!(h.doc::<Account>("accounts", "b").unwrap().balance, 0);
    }

    #[test]
    fn a_deposit_to_an_unknown_account_fails_the_batch_at_that_event() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "a");
        let batch = [
            h.event("a", "Deposited", json!({"amount": 10})),
            h.event("ghost", "Deposited", json!({"amount": 10})),
        ];
        let err = h.apply(&batch).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.message.contains("ghost was never opened"), "{err}");
        // Nothing of the failed batch is kept.
        assert_eq!(h.doc::<Account>("accounts", "a").unwrap().balance, 0);
    }

    #[test]
    fn a_malformed_payload_names_the_event() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "a");
        let err = h
            .emit("a", "Deposited", json!({"amount": "lots"}))
            .unwrap_err();
        assert!(err.message.contains("invalid Deposited payload"), "{err}");
    }

    #[test]
    fn a_balance_out_of_range_fails_the_event_instead_of_wrapping() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "a");
        h.emit("a", "Deposited", json!({"amount": i64::MAX}))
            .unwrap();
        let err = h
            .emit("a", "Deposited", json!({"amount": i64::MAX}))
            .unwrap_err();
        assert!(err.message.contains("out of range"), "{err}");
        // The failed event changed nothing.
        let account: Account = h.doc("accounts", "a").unwrap();
        assert_eq!((account.balance, account.tx_count), (i64::MAX, 1));
        let err = h
            .emit("a", "Withdrawn", json!({"amount": i64::MIN}))
            .unwrap_err();
        assert!(err.message.contains("withdrawal"), "{err}");
    }

    /// What the variants promise: `v2` differs by its version and `"schema": 2` only.
    #[test]
    fn documents_carry_a_schema_field_in_v2_only() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "a");
        h.emit("a", "Deposited", json!({"amount": 7})).unwrap();
        let doc: serde_json::Value = h.doc("accounts", "a").unwrap();
        let mut expected = json!({"owner": "alice", "currency": "EUR", "balance": 7,
                                  "tx_count": 1, "status": "open", "last_version": 2});
        if cfg!(feature = "v2") {
            expected["schema"] = json!(2);
        }
        assert_eq!(doc, expected);
        let version = if cfg!(feature = "v2") {
            "2.0.0"
        } else {
            "1.0.0"
        };
        assert_eq!(AccountBalance::describe().version, version);
    }

    #[test]
    fn unsubscribed_events_are_ignored() {
        let mut h = Harness::<AccountBalance>::new();
        opened(&mut h, "a");
        h.emit("a", "NicknameChanged", json!({"nick": "x"}))
            .unwrap();
        assert_eq!(h.doc::<Account>("accounts", "a").unwrap().tx_count, 0);
    }
}
