//! A real HTTP receiver for observers' webhooks: it deduplicates by `Idempotency-Key`, records
//! every arrival, and misbehaves on demand (errors, stalls, a 400 for chosen streams). Shared by
//! the observer tests and the benchmark.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub key: String,
    pub attempt: u32,
    pub at: Instant,
    pub status: u16,
}

/// How the receiver misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Share of requests answered 500.
    pub fail_rate: f64,
    /// Share of requests that stall for `stall`, then answer 503 (the client has given up).
    pub stall_rate: f64,
    pub stall: Duration,
    /// Streams (the body's `stream`) answered 400 while `broken` is set.
    pub reject_streams: HashSet<String>,
    /// Streams always answered 500.
    pub failing_streams: HashSet<String>,
}

#[derive(Default)]
pub struct Log {
    pub arrivals: Vec<Arrival>,
    /// Keys accepted (answered 2xx the first time), in acceptance order.
    pub accepted: Vec<String>,
    seen: HashMap<String, serde_json::Value>,
    /// Bodies that differed between two arrivals of one key.
    pub conflicts: Vec<String>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Log>>,
    pub broken: Arc<AtomicBool>,
    pub requests: Arc<AtomicU64>,
    _server: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    behaviour: Arc<Behaviour>,
    log: Arc<Mutex<Log>>,
    broken: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Self {
        let shared = Shared {
            behaviour: Arc::new(behaviour),
            log: Arc::default(),
            broken: Arc::new(AtomicBool::new(true)),
            requests: Arc::default(),
        };
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            log: shared.log,
            broken: shared.broken,
            requests: shared.requests,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn accepted(&self) -> Vec<String> {
        self.log.lock().unwrap().accepted.clone()
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.log.lock().unwrap().arrivals.clone()
    }
}

async fn hook(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let key = header("idempotency-key");
    let attempt = header("x-projector-attempt").parse().unwrap_or(0);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let stream = body["stream"].as_str().unwrap_or_default().to_owned();
    let at = Instant::now();
    let b = &s.behaviour;
    let roll: f64 = rand::random();
    let status = if b.failing_streams.contains(&stream) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else if s.broken.load(Ordering::Relaxed) && b.reject_streams.contains(&stream) {
        StatusCode::BAD_REQUEST
    } else if roll < b.stall_rate {
        tokio::time::sleep(b.stall).await;
        StatusCode::SERVICE_UNAVAILABLE
    } else if roll < b.stall_rate + b.fail_rate {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let mut log = s.log.lock().unwrap();
    if status == StatusCode::OK {
        match log.seen.get(&key) {
            Some(first) if *first != body => log.conflicts.push(key.clone()),
            Some(_) => {}
            None => {
                log.seen.insert(key.clone(), body.clone());
                log.accepted.push(key.clone());
            }
        }
    }
    log.arrivals.push(Arrival {
        key,
        attempt,
        at,
        status: status.as_u16(),
    });
    status
}
