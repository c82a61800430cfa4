//! Fine-tuning a bi-encoder on the CPU reference path: the backward pass of the encoder
//! ([`encoder_grad`], over the op backwards in `cpu::backward`), the fused contrastive loss
//! ([`loss`]), AdamW and the schedule ([`optim`]), training data ([`data`]), hard-negative
//! mining from our own index ([`mining`]) and the samplers over its pool ([`sampler`]),
//! counter-based randomness ([`rng`]), checkpoints ([`checkpoint`], [`state`]), the loop
//! ([`trainer`]) with its knobs ([`config`]), and data parallelism ([`parallel`] over the
//! [`collective`] layer).

pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod encoder_grad;
pub mod holdout;
pub mod loss;
pub mod mining;
pub mod optim;
pub mod parallel;
pub mod rng;
pub mod rrra;
pub mod sampler;
pub mod state;
pub mod trainer;
