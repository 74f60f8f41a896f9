//! Scraping: targets from discovery ([`target`]), the per-target loop ([`scrape_loop`]) with
//! its HTTP fetch ([`client`]) and zero-copy parser ([`parse`]), and the [`manager`] that keeps
//! one loop per target.

pub mod appender;
pub mod client;
pub mod manager;
pub mod parse;
pub mod scrape_loop;
pub mod target;
