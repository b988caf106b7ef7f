//! What a plugin's instance may touch: nothing but what the host hands it.
//!
//! Guests built with Rust's std import `wasi:cli`, `wasi:clocks`, `wasi:random`,
//! `wasi:filesystem` and `wasi:sockets` whether they use them or not, so those are linked,
//! but served by a context with no preopened directory, no environment, no arguments, no stdin,
//! sockets disabled, clocks frozen at the batch's last event time and randomness seeded from the
//! batch: the same events always produce the same read model.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use wasmtime::{ResourceLimiter, Result as WasmResult};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};

use crate::event::Event;

/// Builds the WASI context for one call over `events`.
pub(crate) fn wasi_context(
    events: &[Event],
    stdout: &GuestOutput,
    stderr: &GuestOutput,
) -> WasiCtx {
    let now_ms = events.last().map(|e| e.timestamp_ms).unwrap_or(0);
    let seed = batch_seed(events);
    let mut builder = WasiCtxBuilder::new();
    builder
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .wall_clock(FrozenWallClock(Duration::from_millis(now_ms)))
        .monotonic_clock(FrozenMonotonicClock(now_ms.saturating_mul(1_000_000)))
        .secure_random(rand::rngs::StdRng::seed_from_u64(seed))
        .insecure_random(rand::rngs::StdRng::seed_from_u64(
            seed ^ 0x9e37_79b9_7f4a_7c15,
        ))
        .insecure_random_seed(u128::from(seed) << 64 | u128::from(seed.rotate_left(17)))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    builder.build()
}

/// A per-batch seed: the same batch always gets the same randomness, another batch other.
fn batch_seed(events: &[Event]) -> u64 {
    let mut hasher = DefaultHasher::new();
    if let (Some(first), Some(last)) = (events.first(), events.last()) {
        first.id.hash(&mut hasher);
        last.id.hash(&mut hasher);
        last.position.hash(&mut hasher);
    }
    hasher.finish()
}

struct FrozenWallClock(Duration);

impl HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        self.0
    }
}

struct FrozenMonotonicClock(u64);

impl HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        self.0
    }
}

/// Caps the guest's memories and tables, and remembers that it did so, so that the trap that
/// follows a refused `memory.grow` is reported as what it is.
pub(crate) struct Limiter {
    pub memory_bytes: usize,
    pub memory_exceeded: bool,
}

pub(crate) const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WasmResult<bool> {
        if desired > self.memory_bytes {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WasmResult<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A guest's stdout or stderr: kept in memory up to a cap (the rest is counted and dropped, so
/// a chatty guest neither fails nor floods the host's logs), then logged by the host.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    inner: Arc<Mutex<OutputBuf>>,
}

struct OutputBuf {
    bytes: Vec<u8>,
    cap: usize,
    dropped: usize,
}

impl GuestOutput {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(OutputBuf {
                bytes: Vec::new(),
                cap,
                dropped: 0,
            })),
        }
    }

    fn push(&self, data: &[u8]) {
        let mut buf = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let room = buf.cap.saturating_sub(buf.bytes.len());
        let kept = room.min(data.len());
        buf.bytes.extend_from_slice(&data[..kept]);
        buf.dropped += data.len() - kept;
    }

    /// Takes what was written: the text, and how many bytes were dropped past the cap.
    pub fn take(&self) -> (String, usize) {
        let mut buf = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let text = String::from_utf8_lossy(&buf.bytes).into_owned();
        buf.bytes.clear();
        (text, std::mem::take(&mut buf.dropped))
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
