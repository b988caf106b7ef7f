//! projector's integration tests, linked into one binary (one module per feature). They run the
//! real library and binary against real plugins compiled from `plugins/`.

mod admin;
mod api_contract;
mod author;
mod bad_input;
mod contract;
mod faults;
mod hardening;
mod hot_swap;
mod isolation;
mod kafka;
mod live_load;
mod metrics_format;
mod numbers;
mod observers;
mod operator_cli;
mod pipeline;
mod postgres;
mod receiver;
mod replay;
mod restart;
mod runtime;
mod sdk_package;
mod second_language;
mod seed;
mod store;
mod support;
mod ui;
mod uploads_runtime;
mod waiters;
mod watermark;
