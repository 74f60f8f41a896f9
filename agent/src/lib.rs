//! The sre-lab agent: scrapes Prometheus targets discovered on its node, parses them
//! zero-copy, and ships the samples through an on-disk write-ahead queue to Prometheus
//! remote-write receivers.
//!
//! Data flow: [`discovery`] → [`scrape`] (targets, loops, parser, relabel) → [`wal`] (one
//! write-ahead log per receiver, opaque records of [`frame`]s) → [`sender`] (the engine:
//! batching, shards, retry, acks, commit) speaking a [`sender::Protocol`] ([`remote_write`]'s
//! Prometheus remote write 1.0 first) → receiver; [`telemetry`] exposes self metrics and the
//! status page; [`app`] wires it together and handles reload and shutdown.

pub mod app;
pub mod discovery;
pub mod flows;
pub mod frame;
pub mod http;
pub mod kubeapi;
pub mod labels;
pub mod logs;
pub mod loki;
pub mod pods;
pub mod relabel;
pub mod remote_write;
pub mod scrape;
pub mod sender;
pub mod telemetry;
pub mod wal;
