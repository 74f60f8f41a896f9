//! The logs path (issue 9, in progress): container log formats, positions and the pipeline
//! stages so far. Tailing and the Loki source come next; see docs/ARCHITECTURE.md.

pub mod format;
pub mod pipeline;
pub mod positions;
