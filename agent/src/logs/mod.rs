//! The logs path (issue 9, in progress): container log formats so far. Tailing, positions,
//! the pipeline stages and the Loki source come next; see docs/ARCHITECTURE.md.

pub mod format;
