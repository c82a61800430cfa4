//! BERT-family models from a Hugging Face / sentence-transformers folder: configuration,
//! weights (safetensors, memory-mapped), tokenizer, the encoder forward pass and pooling.

pub mod bert;
pub mod config;
pub mod encoder;
pub mod pooling;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;
pub mod wordpiece;

pub use config::BertConfig;
pub use encoder::{EncodeScratch, Encoder, EncoderOptions};
pub use pooling::Pooling;
