//! The operator's settings for this plugin: the keys of the table `[plugins.<name>]` in the
//! host's config file (a webhook's URL, a threshold). Values come as text, as written there
//! (numbers and booleans in their TOML spelling); [`parse`] turns one into a typed value.
//!
//! In WASM every call asks the host; natively (tests) the values are the ones the test
//! harness was given ([`Harness::config`](crate::testing::Harness::config),
//! [`ObserverHarness::config`](crate::testing::ObserverHarness::config)).

use std::str::FromStr;

use crate::{Error, Result};

/// The value of `key`; `None` when the operator did not set it.
pub fn get(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return crate::guest::config_get(key);
    #[cfg(not(target_arch = "wasm32"))]
    return native::get(key);
}

/// Every key the operator set, with its value, sorted by key.
pub fn entries() -> Vec<(String, String)> {
    #[cfg(target_arch = "wasm32")]
    return crate::guest::config_entries();
    #[cfg(not(target_arch = "wasm32"))]
    return native::entries();
}

/// The value of `key` parsed as a `T`; `None` when it is not set. A value that does not parse
/// is an error naming the key and the value, so the operator sees which setting to fix.
pub fn parse<T>(key: &str) -> Result<Option<T>>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let Some(value) = get(key) else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|err| {
        Error::msg(format!(
            "config key `{key}` has the invalid value {value:?}: {err}"
        ))
    })
}

/// The harnesses' settings: one map per thread, so tests running in parallel each see their
/// own harness's. Built in WASM too, where the harnesses build but nothing reads the map.
pub(crate) mod native {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        static CONFIG: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(super) fn get(key: &str) -> Option<String> {
        CONFIG.with(|config| config.borrow().get(key).cloned())
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(super) fn entries() -> Vec<(String, String)> {
        CONFIG.with(|config| {
            config
                .borrow()
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
    }

    /// Runs `f` with `config` as the thread's settings, then puts the previous ones back: two
    /// harnesses in one test each run with their own.
    pub(crate) fn with<R>(config: &BTreeMap<String, String>, f: impl FnOnce() -> R) -> R {
        struct Restore(BTreeMap<String, String>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = std::mem::take(&mut self.0);
                CONFIG.with(|config| *config.borrow_mut() = previous);
            }
        }
        let previous = CONFIG.with(|current| current.replace(config.clone()));
        let _restore = Restore(previous);
        f()
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::testing::Harness;

    /// Stores what the config says, so a test can see what a projection read.
    struct Settings;

    impl Projection for Settings {
        fn describe() -> Descriptor {
            Descriptor::new("settings", "1.0.0").collection("seen", &[])
        }
        fn handle(event: &Event, state: &mut State) -> Result<()> {
            let limit: Option<u32> = config::parse("limit")?;
            let seen = (config::get("name"), limit, config::entries());
            state.put("seen", &event.stream, seen);
            Ok(())
        }
    }

    type Seen = (Option<String>, Option<u32>, Vec<(String, String)>);

    #[test]
    fn a_projection_reads_the_harness_config() {
        let mut h = Harness::<Settings>::new()
            .config("name", "alpha")
            .config("limit", "7")
            .config("a-first", "x");
        h.emit("s", "E", serde_json::json!({})).unwrap();
        let (name, limit, entries) = h.doc::<Seen>("seen", "s").unwrap();
        assert_eq!((name.as_deref(), limit), (Some("alpha"), Some(7)));
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a-first", "limit", "name"], "sorted by key");
    }

    #[test]
    fn unset_keys_are_none() {
        let mut h = Harness::<Settings>::new();
        h.emit("s", "E", serde_json::json!({})).unwrap();
        assert_eq!(h.doc::<Seen>("seen", "s"), Some((None, None, vec![])));
    }

    #[test]
    fn a_value_that_does_not_parse_names_the_key_and_the_value() {
        let mut h = Harness::<Settings>::new().config("limit", "-1");
        let err = h.emit("s", "E", serde_json::json!({})).unwrap_err();
        assert_eq!(err.event_index(), Some(0));
        assert!(err.message.contains("`limit`"), "{err}");
        assert!(err.message.contains("\"-1\""), "{err}");
    }

    #[test]
    fn each_harness_runs_with_its_own_config_and_leaves_none_behind() {
        let mut a = Harness::<Settings>::new().config("name", "a");
        let mut b = Harness::<Settings>::new().config("name", "b");
        a.emit("s", "E", serde_json::json!({})).unwrap();
        b.emit("s", "E", serde_json::json!({})).unwrap();
        assert_eq!(a.doc::<Seen>("seen", "s").unwrap().0.as_deref(), Some("a"));
        assert_eq!(b.doc::<Seen>("seen", "s").unwrap().0.as_deref(), Some("b"));
        assert_eq!(config::get("name"), None);
    }
}
