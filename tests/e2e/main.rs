//! End-to-end tests with real peers: Debian's `prometheus` (as remote-write receiver and as
//! the oracle that scrapes the same targets) and `prometheus-node-exporter`.

mod cli;
mod common;
mod flows;
mod hostile;
mod installer_kube;
mod kube;
mod lab;
mod logs;
mod metrics_oracle;
mod outage;
mod queue;
mod redirects;
mod reload;
mod scrape_options;
mod tls;
