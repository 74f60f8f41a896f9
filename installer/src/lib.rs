//! `installer`: stands up the sre-lab lab (Talos, Cilium + Hubble, Prometheus + Alertmanager,
//! Loki, Grafana, the sre-lab agent) and operates it afterwards.
//!
//! A lab file ([`config::lab::LabConfig`]) becomes an ordered list of idempotent steps
//! ([`plan`]); [`exec`] runs them with progress, recording what finished so `up` resumes.
//! External tools are driven through [`runner`]; the Kubernetes API through kube-rs ([`kube`]).

pub mod cli;
pub mod deps;
pub mod exec;
pub mod init;
pub mod kube;
pub mod kubeconfig;
pub mod plan;
pub mod progress;
pub mod redact;
pub mod runner;
pub mod state;
pub mod validate;
pub mod values;
pub mod yaml;
