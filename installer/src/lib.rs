//! sre-lab installer library.
