//! PNG plots (placeholder until implemented).
