//! Webhook delivery: one pooled keep-alive client per observer, its allow-list, and what each
//! answer means (delivered, try again, give up).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::action::{ActionKind, Logged};
use crate::config::DeliveryConfig;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx.
    Delivered { status: u16 },
    /// Worth trying again: 5xx, 408, 429, a timeout, a connection error. `retry_after`: what
    /// the receiver asked for.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Will not get better: another 4xx, a host outside the allow-list, a bad URL.
    Permanent { status: Option<u16>, error: String },
}

/// The hosts an observer may call: `host`, `host:port`, or `*.domain` for its subdomains.
#[derive(Debug, Clone)]
pub struct AllowList(Vec<String>);

impl AllowList {
    pub fn new(hosts: &[String]) -> Self {
        Self(hosts.iter().map(|h| h.to_ascii_lowercase()).collect())
    }

    pub fn allows(&self, url: &reqwest::Url) -> bool {
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        let with_port = url
            .port_or_known_default()
            .map(|port| format!("{host}:{port}"));
        self.0.iter().any(|allowed| {
            if let Some(domain) = allowed.strip_prefix("*.") {
                host.ends_with(&format!(".{domain}"))
            } else {
                *allowed == host || Some(allowed) == with_port.as_ref()
            }
        })
    }
}

/// An observer's HTTP client: pooled, keep-alive, a timeout per request, redirects followed
/// only within the allow-list.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    allow: AllowList,
}

impl Client {
    pub fn new(config: &DeliveryConfig) -> Result<Self, reqwest::Error> {
        let allow = AllowList::new(&config.allow_hosts);
        let redirects = allow.clone();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms))
            .pool_max_idle_per_host(config.max_in_flight)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 || !redirects.allows(attempt.url()) {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            }))
            .build()?;
        Ok(Self { http, allow })
    }

    /// Attempt number `attempt` of a webhook action: its key goes in `Idempotency-Key`, with
    /// the event id and the attempt number.
    pub async fn send(&self, action: &Logged, attempt: u32) -> Attempt {
        let permanent = |error: String| Attempt::Permanent {
            status: None,
            error,
        };
        let ActionKind::Webhook {
            method,
            url,
            headers,
            body,
        } = &action.kind
        else {
            return permanent(format!("{} is not a webhook", action.kind.as_str()));
        };
        let (key, event_id) = (action.key.as_str(), action.event_id.as_str());
        let url = match reqwest::Url::parse(url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            Ok(url) => return permanent(format!("{url}: only http and https URLs are called")),
            Err(err) => return permanent(format!("{url:?} is not a URL: {err}")),
        };
        if !self.allow.allows(&url) {
            return permanent(format!(
                "{} is not in the observer's allow_hosts: no request was made",
                url.host_str().unwrap_or("(no host)")
            ));
        }
        let method = match reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
            Ok(method) => method,
            Err(_) => return permanent(format!("{method:?} is not an HTTP method")),
        };
        let mut map = HeaderMap::with_capacity(headers.len() + 3);
        for (name, value) in headers {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => return permanent(format!("header {name:?} is not a valid HTTP header")),
            }
        }
        for (name, value) in [
            ("idempotency-key", key),
            ("x-projector-event-id", event_id),
            ("x-projector-attempt", &attempt.to_string()),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                map.insert(HeaderName::from_static(name), value);
            }
        }
        let sent = self
            .http
            .request(method, url)
            .headers(map)
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(response) => classify(response.status().as_u16(), retry_after(&response)),
            Err(err) => Attempt::Retry {
                status: None,
                error: if err.is_timeout() {
                    "timed out".to_owned()
                } else {
                    error_chain(&err)
                },
                retry_after: None,
            },
        }
    }
}

/// What a status means for the action.
pub fn classify(status: u16, retry_after: Option<Duration>) -> Attempt {
    match status {
        200..=299 => Attempt::Delivered { status },
        408 | 429 | 500..=599 => Attempt::Retry {
            status: Some(status),
            error: format!("the receiver answered {status}"),
            retry_after,
        },
        300..=399 => Attempt::Permanent {
            status: Some(status),
            error: format!(
                "the receiver answered {status}, a redirect outside the allow-list (or too many)"
            ),
        },
        _ => Attempt::Permanent {
            status: Some(status),
            error: format!("the receiver answered {status}"),
        },
    }
}

/// `Retry-After` in seconds (an HTTP date is not honoured: receivers that rate-limit send
/// seconds).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(classify(204, None), Attempt::Delivered { .. }));
        for status in [408, 429, 500, 503] {
            assert!(
                matches!(classify(status, None), Attempt::Retry { .. }),
                "{status}"
            );
        }
        for status in [400, 401, 404, 410, 301] {
            assert!(
                matches!(classify(status, None), Attempt::Permanent { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn the_allow_list_matches_hosts_ports_and_subdomains() {
        let allow = AllowList::new(&[
            "hooks.example.com".into(),
            "127.0.0.1:9000".into(),
            "*.corp.io".into(),
        ]);
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(allow.allows(&url("https://hooks.example.com/x")));
        assert!(allow.allows(&url("http://127.0.0.1:9000/x")));
        assert!(!allow.allows(&url("http://127.0.0.1:9001/x")));
        assert!(allow.allows(&url("http://a.corp.io/x")));
        assert!(!allow.allows(&url("http://corp.io.evil.com/x")));
        assert!(!allow.allows(&url("http://evil.com/hooks.example.com")));
        assert!(!AllowList::new(&[]).allows(&url("http://localhost/")));
    }
}
