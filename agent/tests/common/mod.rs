//! Fixtures shared by the agent's integration tests.

use std::path::Path;

use agent::scrape::scrape_loop::ScrapeSettings;

/// Settings of a plain job `j`: no auth, no limits, no metric relabeling.
pub fn plain_settings(dir: &Path) -> ScrapeSettings {
    ScrapeSettings {
        job: "j".into(),
        client: agent::http::build_client(dir, None, true).unwrap(),
        auth: agent::http::Auth::None,
        honor_labels: false,
        honor_timestamps: true,
        sample_limit: 0,
        label_limit: 0,
        label_name_length_limit: 0,
        label_value_length_limit: 0,
        body_size_limit: 0,
        metric_relabel: vec![],
        follow_redirects: true,
        report_series: true,
    }
}
