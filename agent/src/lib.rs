//! The sre-lab agent: scrapes Prometheus targets discovered on its node, parses them
//! zero-copy, and ships the samples through an on-disk write-ahead queue to Prometheus
//! remote-write receivers.
//!
//! Data flow: [`discovery`] → [`scrape`] (targets, loops, parser, relabel) → [`remote_write`]
//! (WAL, sender) → receiver; [`telemetry`] exposes self metrics and the status page; [`app`]
//! wires it together and handles reload and shutdown.

pub mod app;
pub mod discovery;
pub mod http;
pub mod labels;
pub mod relabel;
pub mod remote_write;
pub mod scrape;
pub mod telemetry;
