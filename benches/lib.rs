//! Criterion benches live in this package; see `benches/*.rs`.
