use serde::de::DeserializeOwned;

use crate::Error;

/// One domain event (see the `event` record in `wit/plugin.wit`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub id: String,
    pub stream: String,
    pub stream_type: String,
    pub event_type: String,
    pub version: u64,
    pub position: u64,
    pub timestamp_ms: u64,
    /// UTF-8 JSON; decode it with [`Event::payload`].
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Event {
    /// Decodes the JSON payload into `T`. An error names the event type and the path of the
    /// field at fault: `invalid OrderPlaced payload: items[0].price: invalid type: string "x",
    /// expected i64 at line 1 column 30`.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, Error> {
        crate::decode_json(&self.payload)
            .map_err(|err| Error::msg(format!("invalid {} payload: {err}", self.event_type)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::Event;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)] // Only decoded, to see where decoding fails.
    struct Order {
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Item {
        sku: String,
        price: i64,
    }

    fn event(payload: &str) -> Event {
        Event {
            event_type: "OrderPlaced".into(),
            payload: payload.as_bytes().to_vec(),
            ..Event::default()
        }
    }

    #[test]
    fn a_payload_error_names_the_path_of_the_field() {
        let bad = event(r#"{"items":[{"sku":"a","price":1},{"sku":"b","price":"x"}]}"#);
        let err = bad.payload::<Order>().unwrap_err();
        assert!(
            err.message().starts_with(
                r#"invalid OrderPlaced payload: items[1].price: invalid type: string "x", expected i64"#
            ),
            "{err}"
        );
        let missing = event(r#"{"items":[{"price":1}]}"#);
        let err = missing.payload::<Order>().unwrap_err();
        assert!(
            err.message()
                .starts_with("invalid OrderPlaced payload: items[0]: missing field `sku`"),
            "{err}"
        );
    }

    #[test]
    fn a_payload_that_is_wrong_as_a_whole_has_no_path() {
        let err = event(r#""an order""#).payload::<Order>().unwrap_err();
        assert!(
            err.message()
                .starts_with("invalid OrderPlaced payload: invalid type: string"),
            "{err}"
        );
        let err = event(r#"{"items":[]} trailing"#)
            .payload::<Order>()
            .unwrap_err();
        assert!(err.message().contains("trailing characters"), "{err}");
        assert!(event(r#"{"items":[]}"#).payload::<Order>().is_ok());
    }
}
