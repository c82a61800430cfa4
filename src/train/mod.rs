//! Fine-tuning a bi-encoder on the CPU reference path.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod rng;
pub mod sampler;
