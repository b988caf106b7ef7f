//! An observer: for every withdrawal above a threshold, a webhook to the operator's URL.
//!
//! Configured in the host's config file:
//!
//! ```toml
//! [plugins.large-withdrawal-alert]
//! threshold = 5000                          # default 1000
//! url = "https://alerts.example/withdrawal" # without it, a log line instead of a webhook
//! ```
//!
//! The observer only says what to do; the host makes the request, retries it, and delivers it
//! once however often the batch is replayed.

use projector_sdk::prelude::*;
use projector_sdk::serde_json::json;

const DEFAULT_THRESHOLD: i64 = 1000;

#[derive(Deserialize)]
struct Withdrawn {
    amount: i64,
}

pub struct LargeWithdrawalAlert;

impl Observer for LargeWithdrawalAlert {
    fn describe() -> Descriptor {
        Descriptor::new("large-withdrawal-alert", "1.0.0").events(&["Withdrawn"])
    }

    fn on_event(event: &Event, actions: &mut Actions) -> Result<()> {
        let threshold = config::parse("threshold")?.unwrap_or(DEFAULT_THRESHOLD);
        let Withdrawn { amount } = event.payload()?;
        if amount <= threshold {
            return Ok(());
        }
        // Without a URL the quick start still shows the observer at work, in the host's log.
        let Some(url) = config::get("url") else {
            actions.log(format!(
                "large withdrawal of {amount} from account {}; set \
                 [plugins.large-withdrawal-alert] url to be called",
                event.stream
            ));
            return Ok(());
        };
        let body = json!({
            "account": event.stream,
            "amount": amount,
            "event_id": event.id,
            "version": event.version,
        });
        actions.webhook(Webhook::post(&url).json(&body)?);
        Ok(())
    }
}

projector_sdk::export_observer!(LargeWithdrawalAlert);

#[cfg(test)]
mod tests {
    use super::*;
    use projector_sdk::testing::ObserverHarness;
    use projector_sdk::ActionKind;

    const URL: &str = "https://alerts.example/withdrawal";

    fn harness() -> ObserverHarness<LargeWithdrawalAlert> {
        ObserverHarness::new().config("url", URL)
    }

    #[test]
    fn a_withdrawal_above_the_threshold_calls_the_webhook() {
        let mut h = harness();
        h.observe("acct-1", "Withdrawn", json!({"amount": 5}))
            .unwrap();
        let actions = h
            .observe("acct-1", "Withdrawn", json!({"amount": 1001}))
            .unwrap();
        let [ActionKind::Webhook(hook)] = actions.as_slice() else {
            panic!("one webhook expected: {actions:?}");
        };
        assert_eq!((hook.method.as_str(), hook.url.as_str()), ("POST", URL));
        assert!(hook
            .headers
            .contains(&("content-type".into(), "application/json".into())));
        let body: serde_json::Value = hook.body_json().unwrap();
        assert_eq!(
            body,
            json!({"account": "acct-1", "amount": 1001, "event_id": "acct-1-2", "version": 2})
        );
    }

    #[test]
    fn withdrawals_up_to_the_threshold_do_nothing() {
        let mut h = harness();
        for amount in [0, 999, 1000, -5000] {
            let actions = h
                .observe("acct-1", "Withdrawn", json!({ "amount": amount }))
                .unwrap();
            assert_eq!(actions, [], "amount {amount}");
        }
    }

    #[test]
    fn the_threshold_comes_from_the_config() {
        let mut h = harness().config("threshold", "50");
        let batch = [
            h.event("a", "Withdrawn", json!({"amount": 50})),
            h.event("b", "Withdrawn", json!({"amount": 51})),
        ];
        let actions = h.run(&batch).unwrap();
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(actions[0].event_index, 1);
    }

    #[test]
    fn without_a_url_it_logs_instead() {
        let mut h = ObserverHarness::<LargeWithdrawalAlert>::new();
        let actions = h
            .observe("acct-9", "Withdrawn", json!({"amount": 2500}))
            .unwrap();
        let [ActionKind::Log(line)] = actions.as_slice() else {
            panic!("one log line expected: {actions:?}");
        };
        assert!(line.contains("2500 from account acct-9"), "{line}");
        assert!(
            line.contains("[plugins.large-withdrawal-alert] url"),
            "{line}"
        );
    }

    #[test]
    fn a_bad_threshold_fails_the_event_naming_the_setting() {
        let mut h = harness().config("threshold", "lots");
        let err = h
            .observe("acct-1", "Withdrawn", json!({"amount": 1}))
            .unwrap_err();
        assert_eq!(err.event_index(), Some(0));
        assert!(err.message.contains("`threshold`"), "{err}");
        assert!(err.message.contains("\"lots\""), "{err}");
    }

    #[test]
    fn other_event_types_are_ignored() {
        let mut h = harness();
        for event_type in ["Deposited", "AccountOpened", "AccountClosed"] {
            let actions = h
                .observe("acct-1", event_type, json!({"amount": 1_000_000}))
                .unwrap();
            assert_eq!(actions, [], "{event_type}");
        }
    }
}
