//! A generated BEIR collection (placeholder until implemented).
